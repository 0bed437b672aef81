"""Quality of every method on the shapes world, against its real ablations and trivial baselines.

    python benchmarks/quality.py TASK [--model builtin] [--scenes 50] [--markdown]

TASK is generation, eraser, grounding, steering, personalize, video, video_move, instruct, parts or all.  Scenes come from the world's test
seeds (`world.TEST_SEED_START` + an offset per task), which training never saw.  One JSON line
per task: the method's figures (means over scenes, the headline's 95 % bootstrap interval as
`<headline>_ci`), each ablation's and baseline's on the same scenes, the headline ablation
(`ablation_figures`, `beats_ablation`), and `margins`: the method's lead on the headline over
each alternative in units of the paired bootstrap spread (positive: the method is better; a
claim needs at least 3).  `--markdown` adds the table the README shows.

- **generation**: prompt = a scene's caption; the image is measured with OpenCV against the
  world's definitions (`world.measure_objects`).  Headline: `exact`, the fraction of images
  whose objects are exactly the prompted (colour, shape) pairs; also `object_recall` and
  `colour_recall`.  Ablation: the same seeds without classifier-free guidance (scale 1).  Also
  `content_word_cosine`: the mean pairwise cosine of the text encoder's states at each
  caption's content words (near 1: the words are indistinguishable to cross-attention).
- **eraser**: remove one object (mask dilated by 2 px, as a brush would); inside the mask,
  `residual` = the fraction of pixels still of the removed object's colour, `mae` = mean
  absolute error (0-255) against the scene rendered without the object, `clean` = residual
  below 5 %.  Headline: residual (lower is better).  Ablation: the same loop without AAS and
  SARG (plain blended-latent inpainting with the empty prompt).  Baselines: the input
  unchanged, OpenCV's Telea inpainting.
- **grounding**: one referring expression per scene; `miou` against the exact mask.  Ablations,
  each separately: without magnets and colour word, with the other renormalisation than the
  backbone's default, without sink handling, and plain cross-attention of the target words (all
  three removed; the headline ablation).  Baselines that read no attention: whole image,
  centred disc, union of all objects.
- **personalize**: two-object scenes (two different shapes, two different colours); each
  method learns both objects ("<new1>" the first, "<new2>" the second, class words their
  shapes) and samples "a <new1> SHAPE1" at `PERSONALIZE_SAMPLES` seeds.  Per scene (mean over
  its samples): `own_colour` (the largest object drawn has object 1's colour), `own` (its colour
  and shape), `leak` (some object of object 2's colour is drawn) and `faithful` (own colour and
  no leak; the headline).  Arms on the same scenes, batches and seeds: DisenDiff (the method),
  AttenCraft, and Custom Diffusion (the same trainer without attention losses; the headline
  ablation).  Baseline: the base model's "a SHAPE1" (it knows neither object).  CPU budget:
  `PERSONALIZE_SETTINGS` (the tab's example: 100 steps, 8 prior images).
- **video** (Edit video, ReAtCo): one-object clips of 8 frames (`world.make_clip`) whose
  object gets another colour, and in every other clip another shape, inside its per-frame box
  (the extent of the old and the new shape + 2 px, keyframed on the first and last frame; motion
  is linear, so the interpolated boxes are exact).  Per clip: `placed` (fraction of frames where the checker finds
  an object of the new colour centred in the box; the headline), `placed_exact` (colour and
  shape), `psnr_outside` (dB against the source outside the boxes) and `flicker` (mean
  frame-to-frame change outside the boxes).  Arms on the same fine-tune and inversion: ReAtCo,
  IRJS only, and neither (the headline ablation, Tune-A-Video editing); baseline: the source
  unchanged.  CPU budget: 20 fine-tune and 10 DDIM steps, one 8-frame window (`VIDEO_SETTINGS`).
- **video_move**: the same clips' object, unchanged, must take its path mirrored (left-right, or
  top-bottom where that keeps old and new boxes apart): the edited prompt is the source's, the
  box is the new path's.  IRJS is off in both arms (the old place must be free to change), so
  the arms are RAD vs none (Tune-A-Video).  `placed` in the new box is the headline;
  `left_behind` is the fraction of frames still showing the object at its old place; PSNR and
  flicker are measured outside both.
- **instruct** (Instruction edit, SaaS; on `builtin-edit`): edits of 2 and 3 parts
  (alternately) from `world.make_edit`, whose exact result is known.  Per edit: `parts_done`
  (fraction of parts the world's checker finds carried out, `world.check_edit`), `all_done`
  (every part; the headline) and `preserve_error` (mean absolute error, 0-1, against the exact
  result over the pixels no part may change; `world.edit_preservation_error`).  Arms with the
  same seed per edit: SaaS (the tab's defaults), plain sampling (the headline ablation) and SaaS
  with the `sink_ratio` gain (the paper's ratio with CLIP's start token as the competitor).
  Baselines: the source unchanged (no-op) and the parts applied one at a time, each edit's
  result the next one's input (what a user of a plain editor does by hand; K times the
  sampling cost).
- **parts** (Instruction edit's multi-part text-to-image mode, SaaS on `builtin`; our
  extrapolation, spec section 7): scenes of 2 and 3 objects, prompted by their caption split
  into parts at commas and " and " ("a red circle", "a blue square", "a green triangle on a
  striped background").  Per scene the generation figures (`object_recall`, the headline;
  `colour_recall`; `exact`).  Arms with the scene's seed: SaaS (the tab's defaults), plain
  generation (the headline ablation), SaaS with a fixed gain of 2, SaaS with the `sink_ratio`
  gain.  Attend-and-Excite, the gradient-based cousin, is not an arm (not built here).
- **steering**: prompts with one red object; MedSteer directions from "a red circle" vs "a
  blue circle" prompts; `flip` = the steered image's largest object is blue, `red_removed` =
  no red object left, `structure_iou` = IoU of the object masks of the pair.  Headline:
  structure_iou (the counterfactual changes the concept, not the layout), to be read with
  `flip`.  Ablation: re-prompting with "blue" at the same seed.  Baseline: no change at all
  (structure IoU 1, flip 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.builtin import world  # noqa: E402

TASKS = ("generation", "eraser", "grounding", "steering", "personalize", "video", "video_move", "instruct", "parts")
# Each task draws its scenes from its own block of test seeds.
SEED_OFFSETS = {"generation": 0, "eraser": 10_000, "grounding": 20_000, "steering": 30_000, "video": 40_000,
                "video_move": 50_000, "personalize": 60_000, "instruct": 70_000, "parts": 80_000}
#: the model a task runs on when --model is not given (the others: builtin)
TASK_MODELS = {"instruct": "builtin-edit"}
HEADLINE = {"generation": ("exact", "higher"), "eraser": ("residual", "lower"),
            "grounding": ("miou", "higher"), "steering": ("structure_iou", "higher"),
            "video": ("placed", "higher"), "video_move": ("placed", "higher"),
            "personalize": ("faithful", "higher"), "instruct": ("all_done", "higher"),
            "parts": ("object_recall", "higher")}


def bootstrap_interval(values, draws: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of the mean of `values` (cases resampled, seeded)."""
    values = np.asarray(values, dtype=np.float64)
    means = values[np.random.default_rng(seed).integers(0, len(values), (draws, len(values)))].mean(1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def bootstrap_spread(values, draws: int = 2000, seed: int = 0) -> float:
    """Standard deviation of the bootstrap means of `values`: the noise a margin is compared with."""
    values = np.asarray(values, dtype=np.float64)
    return float(values[np.random.default_rng(seed).integers(0, len(values), (draws, len(values)))].mean(1).std())


def _figures(task: str, cases: dict[str, np.ndarray]) -> dict:
    """Means of per-scene figures, and the headline's 95 % bootstrap interval as `<key>_ci`."""
    key = HEADLINE[task][0]
    return {**{name: round(float(np.mean(values)), 4) for name, values in cases.items()},
            f"{key}_ci": bootstrap_interval(cases[key])}


def summarise(task: str, method: str, method_cases: dict, ablation: str, ablations: dict,
              baselines: dict | None = None) -> dict:
    """The result of one task: the method's figures, each ablation's and baseline's (same scenes),
    the headline ablation's, and `margins`: the method's lead on the headline over each
    alternative in units of the paired bootstrap spread (positive: the method is better; None
    when the difference is the same on every scene)."""
    key, better = HEADLINE[task]
    sign = 1.0 if better == "higher" else -1.0
    baselines = baselines or {}

    def margin(other: np.ndarray) -> float | None:
        difference = sign * (np.asarray(method_cases[key], float) - np.asarray(other, float))
        spread = bootstrap_spread(difference)
        if spread < 1e-12:  # the same difference on every scene: 0 when equal, else no spread to count in
            return 0.0 if abs(difference.mean()) < 1e-12 else None
        return round(float(difference.mean()) / spread, 2)

    return {
        "method": method, "figures": _figures(task, method_cases),
        "ablation": ablation, "ablation_figures": _figures(task, ablations[ablation]),
        "ablations": {name: _figures(task, cases) for name, cases in ablations.items()},
        "baselines": {name: _figures(task, cases) for name, cases in baselines.items()},
        "margins": {name: margin(cases[key]) for name, cases in {**ablations, **baselines}.items()},
    }


def _per_scene(rows: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """Per-scene figure dicts as one array per figure (the form `summarise` takes)."""
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}


def task_scenes(task: str, count: int, **kwargs) -> list[world.Scene]:
    return list(world.scenes(world.TEST_SEED_START + SEED_OFFSETS[task], count, **kwargs))


def _to_uint8(images) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
            for image in images]


# ------------------------------------------------------------------------------ generation


def generation_cases(images: list[np.ndarray], scenes: list[world.Scene]) -> dict[str, np.ndarray]:
    """Per scene: `exact` (the objects found are exactly the prompted (colour, shape) pairs),
    `object_recall` and `colour_recall` (fractions of the prompted objects / colours found)."""
    exact, objects, colours = [], [], []
    for image, scene in zip(images, scenes):
        got = sorted((o.colour, o.shape) for o in world.measure_objects(image))
        want = sorted((o.colour, o.shape) for o in scene.objects)
        remaining, got_colours = list(got), [c for c, _ in got]
        found_objects = found_colours = 0
        for pair in want:
            if pair in remaining:
                remaining.remove(pair)
                found_objects += 1
            if pair[0] in got_colours:
                got_colours.remove(pair[0])
                found_colours += 1
        exact.append(float(got == want))
        objects.append(found_objects / len(want))
        colours.append(found_colours / len(want))
    return {"exact": np.array(exact), "object_recall": np.array(objects), "colour_recall": np.array(colours)}


def generate_scenes(pipe, scenes: list[world.Scene], guidance: float, steps: int, batch: int = 16) -> list[np.ndarray]:
    from pipelines import models

    height, width = models.default_size(pipe)
    images = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        out = pipe(prompt=[s.caption(0) for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=[torch.Generator().manual_seed(s.seed) for s in chunk],
                   height=height, width=width, output_type="pil", **models.backbone(pipe).call_defaults(pipe))
        images += _to_uint8(out.images)
    return images


def bench_generation(pipe, count: int) -> dict:
    from pipelines import models

    defaults = models.generation_defaults(pipe)
    scenes = task_scenes("generation", count)
    method = generation_cases(generate_scenes(pipe, scenes, defaults["guidance"], defaults["steps"]), scenes)
    ablation = generation_cases(generate_scenes(pipe, scenes, 1.0, defaults["steps"]), scenes)
    return {**summarise("generation", "text-to-image, CFG " + str(defaults["guidance"]), method,
                        "no guidance (scale 1)", {"no guidance (scale 1)": ablation}),
            "content_word_cosine": (lambda c: {"mean": round(float(c.mean()), 4), "ci": bootstrap_interval(c)})(
                content_word_cosines(pipe, scenes)),
            "seconds_per_image": seconds_per_image(pipe, defaults)}


def content_word_cosines(pipe, scenes: list[world.Scene]) -> np.ndarray:
    """Per caption: the mean pairwise cosine of the text encoder's output states at the content
    words (not stop words, not special tokens).  Near 1, every word attends alike and no method
    that reads cross-attention per word can work; the next built-in model's goal is <= 0.5."""
    from pipelines.grounding import load_stopwords

    stopwords = load_stopwords()
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    device = next(encoder.parameters()).device
    values = []
    for scene in scenes:
        ids = tokenizer([scene.caption(0)], return_tensors="pt").input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids[0])
        keep = [i for i, token in enumerate(tokens)
                if token not in tokenizer.all_special_tokens and token.removesuffix("</w>") not in stopwords]
        with torch.no_grad():
            states = torch.nn.functional.normalize(encoder(ids.to(device))[0][0, keep].float(), dim=-1)
        cosines = states @ states.T
        values.append(float(cosines[~torch.eye(len(keep), dtype=torch.bool, device=cosines.device)].mean()))
    return np.array(values)


def seconds_per_image(pipe, defaults: dict, repeats: int = 3) -> float:
    """Median wall seconds of one image at the model's size and default steps (batch 1)."""
    scene = task_scenes("generation", 1)[0]
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        generate_scenes(pipe, [scene], defaults["guidance"], defaults["steps"])
        times.append(time.perf_counter() - start)
    return round(float(np.median(times[1:])), 3)


# ------------------------------------------------------------------------------ eraser


def _eraser_case(scene: world.Scene, size: int):
    import cv2

    index = 0
    mask = scene.mask(index, size)
    brushed = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    return index, mask, brushed


def eraser_cases(results: list[np.ndarray], scenes: list[world.Scene], size: int) -> dict[str, np.ndarray]:
    """Per scene, inside the brushed mask: `residual` (fraction of pixels still of the removed
    object's colour), `invented` (fraction of pixels of any object colour where the scene
    without the object shows background: the object kept, or another one painted into the
    hole), `mae` (0-255, against the scene rendered without it), `clean` (residual below 5 %)
    and `empty` (invented below 5 %: the hole holds no object of any colour)."""
    residual, invented, errors = [], [], []
    for output, scene in zip(results, scenes):
        index, _mask, brushed = _eraser_case(scene, size)
        colour_index = list(world.COLOURS).index(scene.objects[index].colour)
        colours = world.colour_of_pixels(output)
        residual.append(float((colours[brushed] == colour_index).mean()))
        truth = scene.render_without(index, size)
        background = world.colour_of_pixels(truth) < 0
        invented.append(float(((colours >= 0) & background)[brushed].mean()))
        errors.append(float(np.abs(output.astype(np.float32) - truth.astype(np.float32))[brushed].mean()))
    residual, invented = np.array(residual), np.array(invented)
    return {"residual": residual, "invented": invented, "mae": np.array(errors),
            "clean": (residual < 0.05).astype(float), "empty": (invented < 0.05).astype(float)}


def classical_inpaint_scenes(scenes: list[world.Scene], size: int) -> list[np.ndarray]:
    """The trivial baseline: OpenCV's Telea inpainting of the brushed mask (no model)."""
    import cv2

    outputs = []
    for scene in scenes:
        _index, _mask, brushed = _eraser_case(scene, size)
        outputs.append(cv2.inpaint(scene.render(size), brushed.astype(np.uint8), 3, cv2.INPAINT_TELEA))
    return outputs


def erase_scenes(pipe, scenes: list[world.Scene], settings) -> list[np.ndarray]:
    from PIL import Image

    from pipelines import eraser, models

    size = models.default_size(pipe)[0]
    outputs = []
    for scene in scenes:
        _index, _mask, brushed = _eraser_case(scene, size)
        result = eraser.erase(pipe, Image.fromarray(scene.render(size)), brushed, settings, seed=scene.seed,
                              progress=False)
        outputs += _to_uint8([result.image])
    return outputs


def _described(settings, paper) -> str:
    """"strength 1, guidance 1" for the fields where `settings` differs from `paper` (a model's
    own defaults, `Settings.for_model`)."""
    values = {f.name: getattr(settings, f.name) for f in fields(settings)}
    changed = [f"{name.replace('_', ' ')} {value:g}" if isinstance(value, float) else f"{name.replace('_', ' ')} {value}"
               for name, value in values.items() if value != getattr(paper, name)]
    return ", ".join(changed)


def bench_eraser(pipe, count: int) -> dict:
    """Attentive Eraser with the model's defaults (the paper's, or the built-in model's measured
    ones) against its ablation (AAS off and no SARG: blended inpainting with the same strength,
    fill prompt, steps and seed), the same without the fill prompt where there is one, the
    paper's defaults where the model's differ, and two trivial baselines."""
    from pipelines import models
    from pipelines.eraser_settings import PAPER, EraserSettings

    size = models.default_size(pipe)[0]
    scenes = task_scenes("eraser", count)
    settings = EraserSettings.for_model(pipe)
    own = _described(settings, PAPER)
    method = (f"Attentive Eraser (AAS + SARG, the model's defaults: {own})" if own
              else "Attentive Eraser (AAS + SARG, paper defaults)")
    plain = "blended-latent inpainting (no AAS, no SARG), same strength and prompt"
    ablations = {plain: eraser_cases(erase_scenes(pipe, scenes, settings.replace(aas=False)), scenes, size)}
    if settings.fill_prompt:
        ablations["the same without the fill prompt"] = eraser_cases(
            erase_scenes(pipe, scenes, settings.replace(fill_prompt="")), scenes, size)
    if own:
        ablations["Attentive Eraser, paper defaults"] = eraser_cases(erase_scenes(pipe, scenes, PAPER), scenes, size)
        ablations["blended-latent inpainting, paper strength"] = eraser_cases(
            erase_scenes(pipe, scenes, PAPER.replace(aas=False)), scenes, size)
    return summarise(
        "eraser", method, eraser_cases(erase_scenes(pipe, scenes, settings), scenes, size), plain, ablations,
        {"no-op (the input)": eraser_cases([scene.render(size) for scene in scenes], scenes, size),
         "OpenCV Telea inpainting": eraser_cases(classical_inpaint_scenes(scenes, size), scenes, size)})


# ------------------------------------------------------------------------------ grounding


def grounding_cases(count: int) -> list[tuple[world.Scene, world.ReferringExpression]]:
    """One expression per scene (scenes with at least two objects, so there is a distractor)."""
    cases, seed = [], world.TEST_SEED_START + SEED_OFFSETS["grounding"]
    while len(cases) < count:
        scene = world.make_scene(seed)
        expressions = scene.referring_expressions()
        if len(scene.objects) >= 2 and expressions:
            cases.append((scene, expressions[seed % len(expressions)]))
        seed += 1
    return cases


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = int((pred | truth).sum())
    return int((pred & truth).sum()) / union if union else 1.0


def grounding_ious(pipe, cases, settings) -> np.ndarray:
    """Per-case IoU of the grounding pipeline's mask with the target's exact mask."""
    from PIL import Image

    from pipelines import grounding, models

    size = models.default_size(pipe)[0]
    return np.array([_iou(grounding.segment_image(pipe, Image.fromarray(scene.render(size)), expression.text,
                                                  settings).mask, scene.mask(expression.target, size))
                     for scene, expression in cases])


def grounding_baseline_ious(cases, size: int) -> dict[str, np.ndarray]:
    """Masks that look at no attention: the whole image, a centred disc (radius a quarter of the
    side), and the union of every object of the scene (a perfect saliency map that cannot tell
    the objects apart)."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (size / 4) ** 2
    out = {"whole image": [], "centred disc": [], "union of all objects": []}
    for scene, expression in cases:
        truth = scene.mask(expression.target, size)
        union = np.zeros_like(truth)
        for index in range(len(scene.objects)):
            union |= scene.mask(index, size)
        out["whole image"].append(_iou(np.ones_like(truth), truth))
        out["centred disc"].append(_iou(disc, truth))
        out["union of all objects"].append(_iou(union, truth))
    return {name: np.array(values) for name, values in out.items()}


def grounding_ablations(settings, renorm: bool) -> dict:
    """RefAM's real ablations, each removing (or flipping) one of its parts from `settings`, and
    plain cross-attention of the target words (all of them removed).  `renorm`: the
    renormalisation the backbone uses by default (`grounding.default_renorm`)."""
    return {
        "without magnets and colour word": replace(settings, magnets=0, colour=False),
        "with the other renormalisation": replace(settings, renorm=not renorm),
        "without sink handling": replace(settings, gas="none"),
        "plain cross-attention of the target words": replace(settings, magnets=0, colour=False, gas="none",
                                                              renorm=False),
    }


def bench_grounding(pipe, count: int) -> dict:
    from pipelines import grounding, models
    from pipelines.grounding_settings import GroundingSettings

    cases = grounding_cases(count)
    settings = GroundingSettings.for_model(pipe)  # the defaults, or the built-in model's measured ones
    own = _described(settings, GroundingSettings())
    renorm = grounding.default_renorm(models.backbone(pipe)) if settings.renorm is None else settings.renorm
    method = grounding_ious(pipe, cases, settings)
    ablations = grounding_ablations(settings, renorm)
    if own:
        ablations["RefAM, the defaults of every other model"] = GroundingSettings()
    ablation_cases = {name: {"miou": grounding_ious(pipe, cases, variant)} for name, variant in ablations.items()}
    baseline_cases = {name: {"miou": ious}
                      for name, ious in grounding_baseline_ious(cases, models.default_size(pipe)[0]).items()}
    own = f"; the model's defaults: {own}" if own else ""
    return summarise("grounding", f"RefAM (magnets, colour word, GAS exclude, renorm {'on' if renorm else 'off'}{own})",
                     {"miou": method}, "plain cross-attention of the target words", ablation_cases, baseline_cases)


# ------------------------------------------------------------------------------ steering


def steering_scenes(count: int) -> list[world.Scene]:
    """One-object scenes whose object is red."""
    return [replace(scene, objects=(replace(scene.objects[0], colour="red"),))
            for scene in task_scenes("steering", count, num_objects=1)]


def _object_masks(image: np.ndarray) -> np.ndarray:
    return world.colour_of_pixels(image) >= 0


def steering_cases(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per pair: `flip` (the changed image's largest object is blue), `red_removed` (no red object
    left) and `structure_iou` (IoU of the object masks of the two images)."""
    flips, removed, ious = [], [], []
    for original, changed in pairs:
        objects = world.measure_objects(changed)
        colours = {o.colour for o in objects}
        largest = max(objects, key=lambda o: o.area).colour if objects else None
        flips.append(float(largest == "blue"))
        removed.append(float("red" not in colours))
        a, b = _object_masks(original), _object_masks(changed)
        union = (a | b).sum()
        ious.append(float((a & b).sum() / union) if union else 1.0)
    return {"flip": np.array(flips), "red_removed": np.array(removed), "structure_iou": np.array(ious)}


def steering_directions(pipe, samples: int, steps: int, guidance: float):
    from pipelines import steering

    return steering.estimate_directions(pipe, positive="a red circle", negative="a blue circle",
                                        samples=samples, steps=steps, guidance=guidance)


def steer_scenes(pipe, scenes, directions, beta: float | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    from pipelines import steering

    pairs = []
    for scene in scenes:
        kwargs = {} if beta is None else {"beta": beta}
        result = steering.counterfactual_pair(pipe, directions, scene.caption(0), seed=scene.seed, **kwargs)
        pairs.append(tuple(_to_uint8([result.original, result.steered])))
    return pairs


def reprompt_scenes(pipe, scenes, steps: int, guidance: float) -> list[tuple[np.ndarray, np.ndarray]]:
    blue = [replace(s, objects=(replace(s.objects[0], colour="blue"),)) for s in scenes]
    originals = generate_scenes(pipe, scenes, guidance, steps)
    changed = generate_scenes(pipe, blue, guidance, steps)
    return list(zip(originals, changed))


def bench_steering(pipe, count: int, samples: int = 64) -> dict:
    from pipelines import models

    defaults = models.generation_defaults(pipe)
    scenes = steering_scenes(count)
    directions = steering_directions(pipe, samples, defaults["steps"], defaults["guidance"])
    pairs = steer_scenes(pipe, scenes, directions)
    reprompt = "re-prompting with 'blue' at the same seed"
    return summarise(
        "steering", f"MedSteer (red -> blue directions from {samples}+{samples} images)", steering_cases(pairs),
        reprompt, {reprompt: steering_cases(reprompt_scenes(pipe, scenes, defaults["steps"], defaults["guidance"]))},
        # keeps the layout perfectly and changes nothing: structure IoU 1, flip 0
        {"no-op (the original image)": steering_cases([(original, original) for original, _ in pairs])})


# ------------------------------------------------------------------------------ video

#: the clips and the CPU budget of one edit: 8 frames of 64 px, one window over the whole clip
#: (the paper's 4-frame windows only bound GPU memory), 20 fine-tune and 10 DDIM steps (the
#: paper's 200 and 50 take about 10x longer); every other setting is the paper's
VIDEO_FRAMES = 8
VIDEO_SETTINGS = dict(frames=VIDEO_FRAMES, window=VIDEO_FRAMES, tune_steps=20, steps=10, heatmaps=False)
#: PSNR of two identical regions (the no-op baseline outside the boxes), instead of infinity
PSNR_CAP = 60.0
#: pixels added around an object's extent to make its box, as a user would draw it
BOX_MARGIN = 2


@dataclass(frozen=True)
class VideoCase:
    """One edit of a one-object clip: the object gets another colour (and, every other case,
    another shape) inside its per-frame box."""

    clip: world.Clip
    source_prompt: str
    prompt: str
    word: str  # the edited prompt's shape word, bound to the box
    colour: str  # the edited object's colour and shape
    shape: str
    boxes: np.ndarray  # (F, 4) x1, y1, x2, y2 pixels of the 64 px frames: the old and new object's extent + margin
    old_boxes: np.ndarray | None = None  # a move: where the object was (it must leave), else None


def _extent(mask: np.ndarray, size: int, dx: int = 0, dy: int = 0) -> list[int]:
    """The box of a mask's pixels, BOX_MARGIN larger, shifted by (dx, dy), within the frame."""
    rows, cols = np.nonzero(mask)
    return [max(0, cols.min() - BOX_MARGIN + dx), max(0, rows.min() - BOX_MARGIN + dy),
            min(size, cols.max() + 1 + BOX_MARGIN + dx), min(size, rows.max() + 1 + BOX_MARGIN + dy)]


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def video_move_cases(count: int, size: int = 64) -> list[VideoCase]:
    """One-object clips whose object (same colour, shape and prompt) must follow another path: its
    own path mirrored left-right, or top-bottom where that keeps the boxes apart; clips where
    neither does are skipped."""
    cases = []
    seed = world.TEST_SEED_START + SEED_OFFSETS["video_move"]
    while len(cases) < count:
        clip = world.make_clip(seed, VIDEO_FRAMES, num_objects=1)
        seed += 1
        masks = [world.object_mask(objects[0], size) for objects in clip.objects_per_frame]
        old = [_extent(m, size) for m in masks]
        for flip in (lambda m: m[:, ::-1], lambda m: m[::-1, :]):
            new = [_extent(np.ascontiguousarray(flip(m)), size) for m in masks]
            if not any(_overlap(a, b) for a, b in zip(old, new)):
                obj = clip.objects_per_frame[0][0]
                caption = clip.caption(0)
                cases.append(VideoCase(clip, caption, caption, obj.shape, obj.colour, obj.shape, np.array(new),
                                       np.array(old)))
                break
    return cases


def video_cases(count: int, size: int = 64) -> list[VideoCase]:
    cases = []
    for seed in range(world.TEST_SEED_START + SEED_OFFSETS["video"],
                      world.TEST_SEED_START + SEED_OFFSETS["video"] + count):
        clip = world.make_clip(seed, VIDEO_FRAMES, num_objects=1)
        rng = np.random.default_rng(seed)
        obj = clip.objects_per_frame[0][0]
        colour = str(rng.choice([c for c in world.COLOURS if c != obj.colour]))
        shape = obj.shape if len(cases) % 2 == 0 else str(rng.choice([s for s in world.SHAPES if s != obj.shape]))
        edited = replace(obj, colour=colour, shape=shape)
        boxes = []
        for objects in clip.objects_per_frame:  # the extent of the old and the new object (a triangle is lower)
            rows, cols = np.nonzero(world.object_mask(objects[0], size)
                                    | world.object_mask(replace(objects[0], shape=shape), size))
            boxes.append([max(0, cols.min() - BOX_MARGIN), max(0, rows.min() - BOX_MARGIN),
                          min(size, cols.max() + 1 + BOX_MARGIN), min(size, rows.max() + 1 + BOX_MARGIN)])
        cases.append(VideoCase(clip, clip.caption(0), world.caption([edited], clip.background), shape, colour,
                               shape, np.array(boxes)))
    return cases


def _box_masks(boxes: np.ndarray, size: int) -> np.ndarray:
    masks = np.zeros((len(boxes), size, size), bool)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
        mask[y1:y2, x1:x2] = True
    return masks


def video_figures(frames: list[np.ndarray], source: list[np.ndarray], case: VideoCase) -> dict[str, float]:
    """One edited clip's figures: `placed` (fraction of frames where the checker finds an object of
    the edited colour with its centroid inside the frame's box), `placed_exact` (colour and
    shape), `psnr_outside` (dB against the source, outside the boxes, capped at PSNR_CAP) and
    `flicker` (mean absolute frame-to-frame change outside the boxes, 0-255)."""
    size = frames[0].shape[0]
    inside = _box_masks(case.boxes, size)
    if case.old_boxes is not None:  # a move: the old place may change too
        inside |= _box_masks(case.old_boxes, size)
    placed = exact = 0
    for frame, (x1, y1, x2, y2) in zip(frames, case.boxes):
        found = [o for o in world.measure_objects(frame) if o.colour == case.colour
                 and x1 <= o.x * size < x2 and y1 <= o.y * size < y2]
        placed += bool(found)
        exact += any(o.shape == case.shape for o in found)
    edited = np.stack(frames).astype(np.float64)
    original = np.stack(source).astype(np.float64)
    outside = ~inside
    mse = float(((edited - original) ** 2)[outside].mean())
    psnr = PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) * 255 ** 2 else 10 * np.log10(255 ** 2 / mse)
    still = outside[1:] & outside[:-1]  # outside the boxes of both frames
    flicker = float(np.abs(edited[1:] - edited[:-1])[still].mean())
    n = len(frames)
    figures = {"placed": placed / n, "placed_exact": exact / n, "psnr_outside": float(psnr), "flicker": flicker}
    if case.old_boxes is not None:  # the object still (also) at its old place
        figures["left_behind"] = sum(
            any(o.colour == case.colour and x1 <= o.x * size < x2 and y1 <= o.y * size < y2
                for o in world.measure_objects(frame))
            for frame, (x1, y1, x2, y2) in zip(frames, case.old_boxes)) / n
    return figures


#: the arms on the same fine-tune and inversion: the method and its ablations
VIDEO_ARMS = {"ReAtCo (RAD + IRJS)": dict(rad=True, preserve_background=True),
              "IRJS only (no RAD)": dict(rad=False, preserve_background=True),
              "no RAD, no IRJS (Tune-A-Video)": dict(rad=False, preserve_background=False)}


def edit_clips(pipe, cases: list[VideoCase], arms: dict, cache_dir) -> dict[str, list[dict]]:
    """Per arm, per case: the edited clip's figures (each clip fine-tuned and inverted once,
    shared by the arms through the cache)."""
    from pipelines.video import edit_video

    out: dict[str, list[dict]] = {arm: [] for arm in arms}
    for case in cases:
        source = case.clip.frames(64)
        boxes = [(case.word, tuple(case.boxes[0])), (case.word, tuple(case.boxes[-1]), len(source) - 1)]
        for arm, switches in arms.items():
            result = edit_video(pipe, source, case.source_prompt, case.prompt, boxes, cache_dir=cache_dir, fps=8,
                                **VIDEO_SETTINGS, **switches)
            out[arm].append(video_figures(result.frames, result.source, case))
    return out


#: a move needs the old place editable, so IRJS is off in both arms: RAD is what moves the object
VIDEO_MOVE_ARMS = {"RAD (IRJS off)": dict(rad=True, preserve_background=False),
                   "no RAD, no IRJS (Tune-A-Video)": dict(rad=False, preserve_background=False)}


def bench_video(pipe, count: int, task: str = "video") -> dict:
    import tempfile

    cases, arm_settings = (video_cases(count), VIDEO_ARMS) if task == "video" else (video_move_cases(count),
                                                                                   VIDEO_MOVE_ARMS)
    with tempfile.TemporaryDirectory(prefix="quality-video-") as cache:
        arms = edit_clips(pipe, cases, arm_settings, cache)
    as_cases = {arm: _per_scene(figures) for arm, figures in arms.items()}
    noop = _per_scene([video_figures(c.clip.frames(64), c.clip.frames(64), c) for c in cases])
    method, *ablations = arm_settings
    result = summarise(task, method, as_cases[method], ablations[-1], {a: as_cases[a] for a in ablations},
                       {"no-op (the source clip)": noop})
    # the second claim of the method: the rest of the clip stays (PSNR outside the boxes), with intervals
    result["psnr_outside_ci"] = {arm: bootstrap_interval(c["psnr_outside"]) for arm, c in as_cases.items()}
    lead = as_cases[method]["psnr_outside"] - as_cases[ablations[-1]]["psnr_outside"]
    result["psnr_outside_margin"] = round(float(lead.mean()) / max(bootstrap_spread(lead), 1e-12), 2)
    result["settings"] = VIDEO_SETTINGS
    return result


# ---------------------------------------------------------------------------- personalize

PERSONALIZE_SETTINGS = {"steps": 100, "prior_images": 8}  # the tab's example budget (CPU)
PERSONALIZE_SAMPLES = 4  # samples of "a <new1> SHAPE" per learned scene
PERSONALIZE_ARMS = {  # name: (method, attention losses)
    "DisenDiff": ("disendiff", True),
    "AttenCraft": ("attencraft", True),
    "Custom Diffusion (no attention losses)": ("disendiff", False),
}


def personalize_scenes(count: int) -> list[world.Scene]:
    """Test scenes of exactly two objects with different shapes and different colours."""
    found, seed = [], world.TEST_SEED_START + SEED_OFFSETS["personalize"]
    while len(found) < count:
        scene = world.make_scene(seed, num_objects=2)
        a, b = scene.objects
        if a.shape != b.shape and a.colour != b.colour:
            found.append(scene)
        seed += 1
    return found


def personalize_figures(images: list[np.ndarray] | None, scene: world.Scene) -> dict[str, float]:
    """One learned scene's figures, each the mean over its samples of "a <new1> SHAPE1"; None: the
    method refused the scene (AttenCraft when it cannot separate the concepts), which counts as
    a scene it got wrong (`refused` 1)."""
    if images is None:
        return {"faithful": 0.0, "own_colour": 0.0, "own": 0.0, "leak": 0.0, "refused": 1.0}
    first, second = scene.objects
    own_colour, own, leak = [], [], []
    for image in images:
        found = world.measure_objects(image)
        largest = max(found, key=lambda o: o.area) if found else None
        own_colour.append(largest is not None and largest.colour == first.colour)
        own.append(largest is not None and (largest.colour, largest.shape) == (first.colour, first.shape))
        leak.append(any(o.colour == second.colour for o in found))
    own_colour, own, leak = (np.array(v, float) for v in (own_colour, own, leak))
    return {"faithful": float((own_colour * (1 - leak)).mean()), "own_colour": float(own_colour.mean()),
            "own": float(own.mean()), "leak": float(leak.mean()), "refused": 0.0}


def learn_and_sample(pipe, scene: world.Scene, method: str, attention_losses: bool, size: int) -> list[np.ndarray] | None:
    from PIL import Image

    from pipelines import personalize
    from pipelines.errors import UserInputError

    first, second = scene.objects
    try:
        trained = personalize.train(pipe, Image.fromarray(scene.render(size)), f"{first.shape},{second.shape}",
                                    method, attention_losses=attention_losses, seed=0, **PERSONALIZE_SETTINGS)
    except UserInputError:  # the method refused this scene
        return None
    return _to_uint8([personalize.generate(pipe, trained.learned, f"a <new1> {first.shape}", seed=k).image
                      for k in range(PERSONALIZE_SAMPLES)])


def bench_personalize(pipe, count: int) -> dict:
    from pipelines import models

    size = models.default_size(pipe)[0]
    scenes = personalize_scenes(count)
    arms = {name: _per_scene([personalize_figures(learn_and_sample(pipe, scene, method, losses, size), scene)
                              for scene in scenes])
            for name, (method, losses) in PERSONALIZE_ARMS.items()}
    base = _per_scene([personalize_figures(generate_scenes_at(pipe, scene, PERSONALIZE_SAMPLES), scene)
                       for scene in scenes])
    method, *ablations = PERSONALIZE_ARMS
    result = summarise("personalize", method, arms[method], ablations[-1], {name: arms[name] for name in ablations},
                       {"base model, \"a SHAPE1\" (learns nothing)": base})
    result["settings"] = {**PERSONALIZE_SETTINGS, "samples": PERSONALIZE_SAMPLES}
    return result


def generate_scenes_at(pipe, scene: world.Scene, samples: int) -> list[np.ndarray]:
    """The base model's "a SHAPE" (the scene's first object's shape word alone) at seeds 0..samples-1,
    with the steps and guidance `personalize.generate` uses (and the model's own scheduler)."""
    from pipelines.personalize import METHODS

    settings = METHODS["disendiff"].settings()
    images = pipe([f"a {scene.objects[0].shape}"] * samples, num_inference_steps=settings.sample_steps,
                  guidance_scale=settings.sample_guidance,
                  generator=[torch.Generator().manual_seed(k) for k in range(samples)]).images
    return _to_uint8(images)


# ---------------------------------------------------------------------------- instruct


def instruct_edits(count: int) -> list[world.Edit]:
    """Test edits of 2 and 3 parts, alternately."""
    start = world.TEST_SEED_START + SEED_OFFSETS["instruct"]
    twos = list(world.edits(start, (count + 1) // 2, num_parts=2))
    threes = list(world.edits(start + 5_000, count // 2, num_parts=3))
    return [edit for pair in zip(twos, threes + [None]) for edit in pair if edit is not None][:count]


def instruct_figures(edit: world.Edit, image) -> dict[str, float]:
    image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    done = world.check_edit(edit, image)
    return {"all_done": float(all(done)), "parts_done": float(np.mean(done)),
            "preserve_error": world.edit_preservation_error(edit, image)}


def bench_instruct(pipe, count: int) -> dict:
    from PIL import Image

    from pipelines.instruct import edit_by_instruction

    edits = instruct_edits(count)
    arms = {"SaaS": [], "plain sampling (same seed)": [], "SaaS, sink_ratio gain": []}
    noop, sequential = [], []
    for index, edit in enumerate(edits):
        source = Image.fromarray(edit.source.render(64))
        result = edit_by_instruction(pipe, source, edit.instruction, seed=index)
        arms["SaaS"].append(instruct_figures(edit, result.edited))
        arms["plain sampling (same seed)"].append(instruct_figures(edit, result.plain))
        sink = edit_by_instruction(pipe, source, edit.instruction, seed=index, gain="sink_ratio", compare=False)
        arms["SaaS, sink_ratio gain"].append(instruct_figures(edit, sink.edited))
        noop.append(instruct_figures(edit, source))
        current = source
        for part in edit.parts:
            current = edit_by_instruction(pipe, current, part.text, seed=index, saas=False).edited
        sequential.append(instruct_figures(edit, current))
    method, ablation, *others = arms
    return summarise("instruct", method, _per_scene(arms[method]), ablation,
                     {name: _per_scene(arms[name]) for name in (ablation, *others)},
                     {"no-op (the source)": _per_scene(noop), "one part at a time (K edits)": _per_scene(sequential)})


# ---------------------------------------------------------------------------- parts


def parts_scenes(count: int) -> list[world.Scene]:
    """Test scenes of 2 and 3 objects (a prompt of 2-3 parts, split at commas and " and ")."""
    start = world.TEST_SEED_START + SEED_OFFSETS["parts"]
    return [scene for scene in world.scenes(start, 4 * count) if len(scene.objects) >= 2][:count]


def bench_parts(pipe, count: int) -> dict:
    from pipelines.instruct import generate_by_parts

    scenes = parts_scenes(count)
    arms = {"SaaS": [], "plain generation (same seed)": [], "SaaS, fixed gain 2": [], "SaaS, sink_ratio gain": []}
    for scene in scenes:
        result = generate_by_parts(pipe, scene.caption(0), seed=scene.seed)
        arms["SaaS"].append(result.edited)
        arms["plain generation (same seed)"].append(result.plain)
        for name, options in (("SaaS, fixed gain 2", dict(gain="fixed", max_gain=2.0)),
                              ("SaaS, sink_ratio gain", dict(gain="sink_ratio"))):
            arms[name].append(generate_by_parts(pipe, scene.caption(0), seed=scene.seed, compare=False,
                                                **options).edited)
    cases = {name: generation_cases(_to_uint8(images), scenes) for name, images in arms.items()}
    method, ablation, *others = arms
    return summarise("parts", method, cases[method], ablation, {name: cases[name] for name in (ablation, *others)})


BENCHES = {"generation": bench_generation, "eraser": bench_eraser, "grounding": bench_grounding,
           "video": bench_video, "video_move": lambda pipe, count: bench_video(pipe, count, "video_move"),
           "steering": bench_steering, "personalize": bench_personalize, "instruct": bench_instruct,
           "parts": bench_parts}


def beats(task: str, result: dict) -> bool:
    key, better = HEADLINE[task]
    method, ablation = result["figures"][key], result["ablation_figures"][key]
    return method > ablation if better == "higher" else method < ablation


def run_task(pipe, task: str, count: int) -> dict:
    start = time.perf_counter()
    result = BENCHES[task](pipe, count)
    return {"task": task, "scenes": count, **result, "headline": HEADLINE[task][0],
            "beats_ablation": beats(task, result), "seconds": round(time.perf_counter() - start, 1)}


def markdown(rows: list[dict]) -> str:
    """One table row per task: the headline with its interval for the method, each ablation and
    each baseline (with the method's margin over it in bootstrap spreads), and the other figures."""

    def cell(figures: dict, key: str) -> str:
        low, high = figures[f"{key}_ci"]
        return f"{figures[key]:.3f} [{low:.3f}, {high:.3f}]"

    lines = ["| task | headline | method | ablations and baselines (margin in spreads) | other figures |",
             "|---|---|---|---|---|"]
    for row in rows:
        key = row["headline"]
        others = ", ".join(f"{k} {v}" for k, v in row["figures"].items() if k not in (key, f"{key}_ci"))
        lead = lambda name: "constant difference" if row["margins"][name] is None else f"{row['margins'][name]:+.1f}"  # noqa: E731
        alternatives = "; ".join(f"{name}: {cell(figures, key)} ({lead(name)})"
                                 for name, figures in {**row["ablations"], **row["baselines"]}.items())
        lines.append(f"| {row['task']} ({row['scenes']} scenes) | {key} | {cell(row['figures'], key)} "
                     f"({row['method']}) | {alternatives} | {others} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=TASKS + ("all",))
    parser.add_argument("--model", default=None,
                        help="the model (default: builtin-edit for instruct, builtin for the others)")
    parser.add_argument("--scenes", type=int, default=50, help="scenes per task (default: 50)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    from pipelines import models

    diffusers_logging.disable_progress_bar()
    rows = []
    for task in TASKS if args.task == "all" else (args.task,):
        model = args.model or TASK_MODELS.get(task, "builtin")
        pipe = models.load(model, device=args.device)
        pipe.set_progress_bar_config(disable=True)
        row = {"model": model, **run_task(pipe, task, args.scenes)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
