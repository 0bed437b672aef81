"""The shapes world (pipelines/builtin/world.py): deterministic scenes whose masks, captions, referring
expressions and object-free renderings agree with the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.builtin import world

TEST_SEEDS = range(world.TEST_SEED_START, world.TEST_SEED_START + 60)


def test_a_seed_is_a_scene():
    first, again = world.make_scene(12345), world.make_scene(12345)
    assert first == again
    assert np.array_equal(first.render(64), again.render(64))
    assert world.make_scene(12346) != first


def test_scenes_cover_the_vocabulary():
    seen_shapes, seen_colours, seen_sizes, seen_backgrounds, counts = set(), set(), set(), set(), set()
    for scene in world.scenes(0, 300):
        counts.add(len(scene.objects))
        seen_backgrounds.add(scene.background.kind)
        for obj in scene.objects:
            seen_shapes.add(obj.shape), seen_colours.add(obj.colour), seen_sizes.add(obj.size)
    assert seen_shapes == set(world.SHAPES)
    assert seen_colours == set(world.COLOURS) and len(seen_colours) >= 5
    assert seen_sizes == set(world.SIZES)
    assert seen_backgrounds == set(world.BACKGROUNDS)
    assert counts == {1, 2, 3}


@pytest.mark.parametrize("size", [64, 96, 128])
def test_masks_are_exactly_the_painted_pixels(size):
    for seed in TEST_SEEDS:
        scene = world.make_scene(seed)
        image = scene.render(size)
        background = world.render(scene.background, (), size)
        masks = scene.masks(size)
        for obj, mask in zip(scene.objects, masks):
            assert mask.any()
            assert (image[mask] == world.COLOURS[obj.colour]).all()
        union = np.any(masks, axis=0)
        # Outside every mask the image is the background; objects never overlap.
        assert np.array_equal(image[~union], background[~union])
        assert sum(m.sum() for m in masks) == union.sum()


def test_rendering_without_an_object_is_the_removal_ground_truth():
    for seed in TEST_SEEDS:
        scene = world.make_scene(seed)
        image = scene.render(64)
        background = world.render(scene.background, (), 64)
        for index in range(len(scene.objects)):
            removed = scene.render_without(index, 64)
            mask = scene.mask(index, 64)
            assert np.array_equal(removed[mask], background[mask])
            assert np.array_equal(removed[~mask], image[~mask])


def test_background_tones_never_pass_for_object_colours():
    for seed in TEST_SEEDS:
        scene = world.make_scene(seed)
        labels = world.colour_of_pixels(world.render(scene.background, (), 64))
        assert (labels == -1).all()


def test_measuring_a_rendering_finds_its_objects():
    exact = 0
    for seed in TEST_SEEDS:
        scene = world.make_scene(seed)
        found = sorted((o.colour, o.shape) for o in world.measure_objects(scene.render(64)))
        exact += found == sorted((o.colour, o.shape) for o in scene.objects)
    # Measured: 999 of 1000 test scenes exact (the miss: two same-coloured objects a pixel
    # apart, merged into one region).
    assert exact >= 0.98 * len(TEST_SEEDS)


def test_captions_name_every_object_in_several_phrasings():
    scene = world.Scene(
        seed=0,
        background=world.Background("striped", ("white", "grey"), 0.25, True),
        objects=(world.WorldObject("circle", "red", "medium", 0.25, 0.5),
                 world.WorldObject("square", "blue", "large", 0.7, 0.5)),
    )
    assert scene.caption(0) == "a red circle and a blue square on a striped background"
    captions = scene.captions()
    assert len(set(captions)) == len(captions) >= 6
    for text in captions:
        assert "red circle" in text and "blue square" in text


def test_referring_expressions_name_exactly_one_object():
    objects = (
        world.WorldObject("triangle", "red", "small", 0.2, 0.3),
        world.WorldObject("triangle", "green", "large", 0.75, 0.3),
        world.WorldObject("circle", "red", "medium", 0.5, 0.8),
    )
    expressions = {e.text: e.target for e in world.referring_expressions(objects)}
    assert expressions["the red triangle"] == 0
    assert expressions["the green triangle"] == 1
    assert expressions["the circle"] == 2
    assert expressions["the green shape"] == 1
    assert expressions["the triangle on the left"] == 0
    assert expressions["the triangle on the right"] == 1
    assert expressions["the larger triangle"] == 1
    assert expressions["the smaller triangle"] == 0
    assert "the red shape" not in expressions  # two red objects: ambiguous
    assert "the triangle" not in expressions


def test_every_generated_expression_is_unambiguous():
    relations = {"left": ("x", min), "right": ("x", max), "top": ("y", min), "bottom": ("y", max)}
    for seed in TEST_SEEDS:
        scene = world.make_scene(seed)
        for expression in scene.referring_expressions():
            words = expression.text.removeprefix("the ").split()
            colours = [w for w in words if w in world.COLOURS]
            shapes = [w for w in words if w in world.SHAPES]
            matching = [i for i, o in enumerate(scene.objects)
                        if all(o.colour == c for c in colours) and all(o.shape == t for t in shapes)]
            if words[-1] in relations:  # "the square on the left": the extreme one of its shape
                axis, pick = relations[words[-1]]
                named = pick(matching, key=lambda i: getattr(scene.objects[i], axis))
            elif words[0] in ("larger", "largest", "smaller", "smallest"):
                pick = max if words[0] in ("larger", "largest") else min
                named = pick(matching, key=lambda i: scene.objects[i].radius)
                sizes = sorted(scene.objects[i].radius for i in matching)
                assert len(set(sizes)) > 1 and sizes.count(scene.objects[named].radius) == 1
            else:  # colour and/or shape alone must match exactly one object
                assert len(matching) == 1, (expression, scene.objects)
                named = matching[0]
            assert named == expression.target, (expression, scene.objects)


@pytest.mark.parametrize("frames", [8, 16])
def test_clips_move_objects_over_a_static_background(frames):
    clip = world.make_clip(77, num_frames=frames, num_objects=2)
    images = clip.frames(64)
    assert len(images) == frames == clip.num_frames
    # Each object keeps its look and moves: its mask in the last frame is not the first one.
    for index in range(2):
        first, last = clip.objects_per_frame[0][index], clip.objects_per_frame[-1][index]
        assert (first.shape, first.colour, first.size) == (last.shape, last.colour, last.size)
        assert not np.array_equal(clip.masks(index)[0], clip.masks(index)[-1])
    background = world.render(clip.background, (), 64)
    for f, image in enumerate(images):
        masks = [clip.masks(i)[f] for i in range(2)]
        assert not (masks[0] & masks[1]).any()
        union = masks[0] | masks[1]
        assert np.array_equal(image[~union], background[~union])
    assert world.make_clip(77, num_frames=frames, num_objects=2) == clip


def test_clip_length_is_validated():
    with pytest.raises(ValueError):
        world.make_clip(0, num_frames=4)


def test_dataset_folder_holds_images_masks_ground_truth_and_language(tmp_path):
    import json

    from PIL import Image

    world.write_dataset(tmp_path, world.TEST_SEED_START, 3, size=96, clips=1, frames=8)
    records = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        scene = world.make_scene(record["seed"])
        assert np.array_equal(np.asarray(Image.open(tmp_path / record["image"])), scene.render(96))
        for i, _obj in enumerate(record["objects"]):
            stem = record["image"].removesuffix(".png")
            mask = np.asarray(Image.open(tmp_path / f"{stem}_mask{i}.png")) > 127
            assert np.array_equal(mask, scene.mask(i, 96))
            assert np.array_equal(np.asarray(Image.open(tmp_path / f"{stem}_without{i}.png")), scene.render_without(i, 96))
        assert record["captions"] == scene.captions()
    clip = json.loads((tmp_path / "clips.jsonl").read_text())
    assert (tmp_path / clip["video"]).is_file() and clip["frames"] == 8
