"""Every tab's examples give the right answer on the app's default model (`builtin`).

A new user's first click is an example; these tests run each tab's examples through the same
Python calls and the same defaults as the tab, and check the answer against the scene's exact
ground truth (the examples are shapes-world scenes, `assets/examples/`, whose objects, masks and
object-free renderings `pipelines/builtin/world.py` knows exactly):

- Segment by text: the mask overlaps the named object with IoU >= 0.5.
- Remove object: at most 10 % of the brushed region keeps the removed object's colour, and at
  most 10 % shows any object colour where the scene without it is background.
- Attention maps: the image shows every prompted colour, and each colour word's heatmap is
  hotter on its own object than on the rest of the image.
- Counterfactual steer (the two shapes-world examples): the steered object takes the other
  prompt's colour.
- Instruction edit (on `builtin-edit`, the tab's model): the world's checker finds every part
  of the instruction carried out (`world.check_edit`).

Personalize and Edit video examples take minutes on a CPU; their pipelines are covered by
their own tests and benchmarks.

An example the built-in model still gets wrong is listed in `KNOWN_WRONG` with the measured
reason and runs as a strict expected failure: it cannot hide (the test reports it), and the day
it gives the right answer the test fails until the entry is removed.  One whose figure is within
noise of the check (`BORDERLINE`) is a non-strict expected failure, reported either way.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks import quality
from pipelines import models
from pipelines.builtin import world
from ui import attention_maps_tab, eraser_tab, instruct_tab, segment_tab, steer_tab


@pytest.fixture(scope="module")
def builtin():
    return models.load("builtin", device="cpu")


#: none at present (the Remove tab's former third example, scene 1090005's red triangle, left
#: 0.104 of its hole in object colours at seed 0 and was replaced by one the model erases at
#: seeds 0-2; assets/builtin/README.md gives the honest rate)
KNOWN_WRONG: dict[str, str] = {}
#: known-wrong examples whose measured figure is within noise of the check: another torch or CPU
#: may land on either side, so they are expected failures that may pass (reported as XPASS)
BORDERLINE: set[str] = set()


def _examples(examples, name):
    """The tab's examples as test parameters, the known-wrong ones as strict expected failures
    (of the answer's check only: an exception is still an error)."""
    return [pytest.param(e, id=name(e), marks=[pytest.mark.xfail(strict=name(e) not in BORDERLINE,
                                                                 raises=AssertionError, reason=KNOWN_WRONG[name(e)])]
                         if name(e) in KNOWN_WRONG else []) for e in examples]


def _example_scene(path) -> tuple[world.Scene, int]:
    """The world scene an example picture shows (its seed is in the file name), and its size."""
    scene = world.make_scene(int(str(path).rsplit("_", 1)[-1].split(".")[0]))
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(picture, scene.render(picture.shape[1]))
    return scene, picture.shape[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", _examples(segment_tab.EXAMPLES, lambda e: e[1]))
def test_segment_example_selects_the_named_object(builtin, example):
    from pipelines.grounding import segment_image

    path, expression = example
    scene, size = _example_scene(path)
    target = next(e.target for e in scene.referring_expressions() if e.text == expression)
    result = segment_image(builtin, path, expression, segment_tab.tab_settings("builtin"))
    iou = quality._iou(np.asarray(result.mask) > 0, scene.mask(target, size))
    assert iou >= 0.5, (expression, iou)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", _examples(eraser_tab.EXAMPLES, str))
def test_remove_example_leaves_the_hole_empty(builtin, example):
    from pipelines import eraser

    seed, index = example
    folder = eraser_tab.EXAMPLES_DIR
    scene, size = _example_scene(folder / f"scene_{seed}.png")
    image = Image.open(folder / f"scene_{seed}.png").convert("RGB")
    brushed = np.asarray(Image.open(folder / f"scene_{seed}_mask{index}.png").convert("L")) > 0
    assert brushed[scene.mask(index, size)].all()  # the example's mask covers the object
    result = eraser.erase(builtin, image, brushed, seed=0, progress=False)  # the tab's seed and settings
    # as the benchmark measures it (quality.eraser_cases): the object's own colour, and any
    # object colour where the scene without the object is background (another object painted in)
    colours = world.colour_of_pixels(np.asarray(result.image.convert("RGB")))
    left = float((colours[brushed] == list(world.COLOURS).index(scene.objects[index].colour)).mean())
    background = world.colour_of_pixels(scene.render_without(index, size)) < 0
    invented = float(((colours >= 0) & background)[brushed].mean())
    assert left <= 0.10 and invented <= 0.10, (scene.objects[index], left, invented)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", _examples(attention_maps_tab.EXAMPLES, lambda e: e[0]))
def test_attention_maps_example_draws_the_colours_and_maps_each_colour_word_onto_its_object(builtin, example):
    from pipelines.attention_maps import generate_with_attention_maps

    prompt, seed = example
    result = generate_with_attention_maps(builtin, prompt, seed=seed, progress=False)
    found = world.measure_objects(np.asarray(result.image.convert("RGB")))
    named = [w for w in result.words if w in world.COLOURS]
    assert set(named) <= {o.colour for o in found}, (prompt, [(o.colour, o.shape) for o in found])
    for word in named:
        heat = result.maps[result.words.index(word)]
        own = max((o for o in found if o.colour == word), key=lambda o: o.area).mask
        assert heat[own].mean() > heat[~own].mean(), (prompt, word)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("example", _examples(steer_tab.EXAMPLES[:2], lambda e: e[0]))
def test_steer_example_gives_the_object_the_other_prompts_colour(builtin, example):
    from pipelines import steering
    from pipelines.steering_settings import DirectionSettings

    positive, negative, prompt = example
    directions = steering.estimate_directions(builtin, positive, negative,
                                              DirectionSettings(samples=steer_tab.TAB_SAMPLES))
    pair = steering.counterfactual_pair(builtin, directions, prompt, seed=0)
    before, after = (world.measure_objects(np.asarray(im.convert("RGB"))) for im in (pair.original, pair.steered))
    source, wanted = positive.split()[1], negative.split()[1]
    assert source in {o.colour for o in before}, [o.colour for o in before]
    colours = {o.colour for o in after}
    assert wanted in colours and source not in colours, (prompt, [o.colour for o in after])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", _examples(instruct_tab.examples(), lambda e: e[1]))
def test_instruct_example_carries_out_every_part(example):
    from pipelines.instruct import edit_by_instruction

    path, instruction = example
    seed = int(str(path).rsplit("_", 1)[-1].split(".")[0])
    edit = world.make_edit(seed)
    assert edit.instruction == instruction
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(picture, edit.source.render(picture.shape[1]))
    result = edit_by_instruction(models.load("builtin-edit", device="cpu"), path, instruction, seed=0)  # the tab's seed
    done = world.check_edit(edit, np.asarray(result.edited))
    assert all(done), (instruction, done)
