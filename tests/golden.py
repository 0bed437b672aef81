"""Golden outputs: every task's Python API on fixed seeds, tiny models and `builtin`.

Recorded before a refactor (`python -m tests.golden --write`), checked after it by
tests/test_golden.py: a refactor that claims to change nothing proves it here.  Images are
kept as uint8 arrays, maps as float16, and each result's recorded settings (`params`) as JSON,
so a change of behaviour or of what a result says about itself shows up.

Rewrite the file only for a change that is meant to alter outputs, and say why in the commit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "outputs.npz"


def _photo(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    array = (rng.rand(height, width, 3) * 255).astype(np.uint8)
    array[8:30, 8:30] = [230, 40, 40]
    array[30:56, 34:60] = [40, 40, 230]
    return Image.fromarray(array)


def _mask(width: int = 64, height: int = 64) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[30:56, 34:60] = True
    return mask


def _params(params: dict) -> np.ndarray:
    return np.array(json.dumps(params, sort_keys=True, default=str))


def _image(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def record() -> dict[str, np.ndarray]:
    """Every golden output, by name."""
    from pipelines import attention_maps, eraser, grounding, models, personalize, steering

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order on every machine
    try:
        return _record(attention_maps, eraser, grounding, models, personalize, steering)
    finally:
        torch.set_num_threads(threads)


def _record(attention_maps, eraser, grounding, models, personalize, steering) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}

    def pipe(name):
        return models.load(name, device="cpu", dtype=torch.float32)

    for name in (*models.TINY_MODELS, "builtin"):
        result = attention_maps.generate_with_attention_maps(
            pipe(name), "a red circle and a blue square", seed=3, steps=2, guidance=4.0, height=64, width=64)
        out[f"maps/{name}/image"] = _image(result.image)
        out[f"maps/{name}/maps"] = result.maps.astype(np.float16)
        out[f"maps/{name}/params"] = _params(result.params)

    # the paper's settings on every model, also on builtin whose own defaults differ
    # (`Settings.for_model`): these outputs pin the code, not a model's chosen defaults
    for name in ("tiny", "tiny-sd3", "tiny-flux", "builtin"):
        result = grounding.segment_image(pipe(name), _photo(96, 64), "the red square on the left",
                                         grounding.GroundingSettings(), size=64)
        out[f"segment/{name}/heatmap"] = result.heatmap.astype(np.float16)
        out[f"segment/{name}/mask"] = result.mask
        out[f"segment/{name}/params"] = _params({**result.params, "sinks": result.sinks, "tokens": result.tokens})

    for name in ("tiny", "tiny-sdxl", "builtin"):
        for mode in ("sip", "dip"):
            result = eraser.erase(pipe(name), _photo(), _mask(), eraser.EraserSettings(), seed=1, steps=3,
                                  strength=1.0, mode=mode, progress=False)
            out[f"erase/{name}/{mode}/image"] = _image(result.image)
            out[f"erase/{name}/{mode}/params"] = _params(result.params)

    for name in ("tiny", "tiny-pixart", "builtin"):
        p = pipe(name)
        directions = steering.estimate_directions(p, "a photo of a cat", "a photo of a dog", samples=2, steps=3,
                                                  height=64, width=64)
        pair = steering.counterfactual_pair(p, directions, "a photo of a cat", seed=3, beta=2)
        out[f"steer/{name}/directions"] = np.concatenate([directions.vectors[k].flatten().numpy() for k in directions.layers])
        out[f"steer/{name}/original"] = np.asarray(pair.original, dtype=np.uint8)
        out[f"steer/{name}/steered"] = np.asarray(pair.steered, dtype=np.uint8)
        out[f"steer/{name}/params"] = _params(pair.params)

    # AttenCraft thresholds min-max-normalised attention (a cell is in a mask when it beats the
    # others by tau); on a random-weight model every cell sits near the threshold, and another
    # machine's float rounding flips the first masks and the whole run (seen: tiny's losses
    # 3.19/6.10/4.72 here, 5.68/3.88/3.64 where they were first recorded).  On `builtin`, whose
    # attention finds the scene's objects, the masks are decided far from the threshold.
    scene = Image.open(Path(__file__).resolve().parent.parent / "assets" / "examples" / "scene_1090004.png")
    cases = {"disendiff": (models.build_tiny("tiny"), _photo(96, 72), "cat,dog", {}),
             "attencraft": (models.load("builtin", device="cpu", dtype=torch.float32), scene.convert("RGB"),
                            "triangle,square", {"tau": 0.05})}
    for method, (p, photo, class_words, extra) in cases.items():
        # disendiff trains a fresh tiny copy; a task must leave the cached builtin as it found it
        options = dict(steps=3, prior_images=1, batch_size=1, grad_accum=1, prior_steps=2, lr=1e-3, **extra)
        trainer = personalize.Trainer(p, photo, class_words, method, None, **options)
        losses = [info.loss for info in trainer.run()]
        learned = trainer.learned()
        generated = personalize.generate(p, learned, f"a photo of {learned.tokens[0]}", seed=5, steps=2)
        out[f"personalize/{method}/losses"] = np.array(losses, dtype=np.float64)
        out[f"personalize/{method}/image"] = _image(generated.image)
        out[f"personalize/{method}/params"] = _params(generated.params)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record the outputs into {GOLDEN_FILE}")
    parser.add_argument("--only", metavar="PREFIX", nargs="+", help="with --write: re-record only the outputs whose "
                        "name starts with one of the PREFIXes and keep the rest as recorded")
    args = parser.parse_args(argv)
    outputs = record()
    if args.write:
        if args.only:
            prefixes = tuple(args.only)
            kept = {key: value for key, value in np.load(GOLDEN_FILE).items() if not key.startswith(prefixes)}
            outputs = kept | {key: value for key, value in outputs.items() if key.startswith(prefixes)}
        GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(GOLDEN_FILE, **outputs)
        print(f"wrote {len(outputs)} outputs to {GOLDEN_FILE}")
        return 0
    golden = np.load(GOLDEN_FILE)
    for key, value in outputs.items():
        if value.dtype.kind in "U":
            same = str(value) == str(golden[key])
            print(f"{key}: {'same' if same else 'DIFFERENT'}")
        else:
            diff = np.abs(value.astype(np.float64) - golden[key].astype(np.float64))
            print(f"{key}: max |diff| {diff.max():.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
