"""The built-in model (`builtin`, assets/builtin/): it ships, loads offline, draws what it is
asked to, and every method beats its own ablation on it.

The figures come from `benchmarks/quality.py` on small deterministic samples of the world's test
seeds (never seen in training).  Each floor sits a margin below the value measured on the
shipped weights (noted next to it), so a regression fails while float differences between
CPUs do not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import quality
from pipelines import models
from pipelines.builtin import world

ROOT = Path(__file__).resolve().parents[1]

# Samples (scenes per check) and floors.  Measured on the shipped weights, CPU float32, on
# exactly these samples (2026-11-26): generation exact 0.167 (no CFG 0.125), object recall 0.50
# (0.31), colour recall 0.76; steering red removed 1.0, structure IoU 0.061 (re-prompting
# 0.013).  The model is weak (see assets/builtin/README.md for why), so the floors are low; they
# still catch a model that does not load, draws noise, or a method that stops working.
GENERATION_SAMPLE = 24
GENERATION_EXACT_FLOOR = 0.10
GENERATION_COLOUR_FLOOR = 0.65
ERASER_SAMPLE = 50  # enough scenes for a margin of three bootstrap spreads (see the test)
GROUNDING_SAMPLE = 50  # enough scenes for margins of three bootstrap spreads (see the test)
STEERING_SAMPLE = 6
STEERING_DIRECTION_SAMPLES = 16
STEERING_REMOVED_FLOOR = 0.8
STEERING_IOU_FLOOR = 0.03


@pytest.fixture(scope="module")
def builtin():
    return models.load("builtin", device="cpu")


def test_builtin_ships_as_safetensors_within_25_mb():
    folder = models.BUILTIN_DIR
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert (folder / "model_index.json").is_file() and (folder / "README.md").is_file()
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    assert sum(p.stat().st_size for p in files) <= 25 * 1024 * 1024


def test_builtin_is_an_sd_architecture_with_attention_where_the_methods_need_it(builtin):
    from attention_processors import attention_layer_names

    assert models.family(builtin) == "sd"
    assert type(builtin.text_encoder).__name__ == "CLIPTextModel"
    assert builtin.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # the real CLIP ids
    assert models.default_size(builtin) == (64, 64) and builtin.vae_scale_factor == 4
    names = attention_layer_names(builtin.unet)
    cross = [n for n in names if n.endswith("attn2")]
    grids = {n.split(".")[0] + n.split(".")[1] for n in cross if not n.startswith("mid")}
    assert len(grids) >= 2  # cross-attention at two or more resolutions
    assert any(n.startswith("up_blocks") and n.endswith("attn1") for n in names)
    assert models.generation_defaults("builtin") == models.generation_defaults(builtin)


def test_builtin_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.clear_cache()
    pipe = models.load("builtin", device="cpu")
    assert pipe.unet.dtype == torch.float32  # stored in float16, loaded in the dtype asked for


@pytest.mark.timeout(300)
def test_generation_draws_the_prompted_colours_and_shapes(builtin):
    result = quality.bench_generation(builtin, GENERATION_SAMPLE)
    figures = result["figures"]
    assert figures["exact"] >= GENERATION_EXACT_FLOOR, figures
    assert figures["colour_recall"] >= GENERATION_COLOUR_FLOOR, figures
    # Not asserted: that guidance finds more of the prompted objects than no guidance.  It leads
    # on these 24 scenes (0.48 vs 0.31, 3.2 spreads) but by only 2.2 spreads on 50 (0.47 vs 0.36),
    # short of the three a claim needs.


@pytest.mark.timeout(300)
def test_generate_cli_with_the_builtin_model_draws_a_red_object(tmp_path):
    output = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "generate", "--model", "builtin",
                           "--prompt", "a red circle", "--seed", "0", "--output", str(output)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    params = json.loads(output.with_suffix(".json").read_text())
    defaults = models.generation_defaults("builtin")
    assert (params["steps"], params["guidance"]) == (defaults["steps"], defaults["guidance"])
    # The model gets colours right far more often than shapes (it draws blobs): check the colour.
    found = world.measure_objects(np.asarray(Image.open(output).convert("RGB")))
    assert {o.colour for o in found} == {"red"}, found


@pytest.mark.timeout(600)
def test_attentive_eraser_removes_more_of_the_object_than_doing_nothing(builtin):
    """On 50 fresh scenes the eraser leaves 0.38 of the mask in the object's colour against 0.54
    for the untouched input: a lead of 4.0 paired bootstrap spreads (2.9 on 30 scenes, so fewer
    would not do).  Not asserted, because it is not true on this model: beating plain inpainting
    (0.34, the eraser trails by 1.3 spreads) or OpenCV's Telea inpainting (0.00).  The world has
    no empty backgrounds, so the model's prior puts objects back into any hole (model card)."""
    size = 64
    scenes = quality.task_scenes("eraser", ERASER_SAMPLE)
    erased = quality.eraser_cases(quality.erase_scenes(builtin, scenes, aas=True), scenes, size)
    untouched = quality.eraser_cases([scene.render(size) for scene in scenes], scenes, size)
    lead = untouched["residual"] - erased["residual"]
    assert lead.mean() >= 3 * quality.bootstrap_spread(lead), (erased["residual"].mean(), untouched["residual"].mean())
    assert erased["mae"].mean() < 60, erased["mae"].mean()  # 0-255 scale; measured 44


@pytest.mark.timeout(600)
def test_refam_on_the_builtin_model_beats_its_renormalised_variant_and_masks_that_read_no_attention(builtin):
    """On 50 fresh scenes the default (no row renormalisation on UNets) leads the renormalised
    variant, the whole image and a centred disc by at least three paired bootstrap spreads
    (measured 4.5, 4.1 and 3.4: mIoU 0.189 vs 0.022, 0.044, 0.073).  It does not beat the union
    of all objects (0.44): this model's word maps are nearly identical (model card), which the
    built-in model v2 has to fix; the test asserts nothing about that comparison."""
    result = quality.bench_grounding(builtin, GROUNDING_SAMPLE)
    margins = result["margins"]
    for name in ("with the other renormalisation", "whole image", "centred disc"):
        assert margins[name] is not None and margins[name] >= 3, (name, margins, result["figures"],
                                                                  result["ablations"], result["baselines"])


def test_the_plain_cross_attention_ablation_is_a_map_not_a_constant(builtin):
    """The old ablation renormalised each row over the very columns it averaged, so its heatmap
    was exactly constant; plain cross-attention must vary over the image."""
    from dataclasses import replace

    from pipelines import grounding
    from pipelines.grounding_settings import GroundingSettings

    plain = quality.grounding_ablations(GroundingSettings(), renorm=False)["plain cross-attention of the target words"]
    for scene, expression in quality.grounding_cases(3):
        for settings in (plain, replace(plain, filter_magnets=False)):
            result = grounding.segment_image(builtin, Image.fromarray(scene.render(64)), expression.text, settings)
            assert float(np.std(result.heatmap)) > 0.05, expression.text


@pytest.mark.timeout(600)
def test_medsteer_changes_the_colour_and_keeps_the_layout(builtin):
    result = quality.bench_steering(builtin, STEERING_SAMPLE, samples=STEERING_DIRECTION_SAMPLES)
    figures = result["figures"]
    assert figures["red_removed"] >= STEERING_REMOVED_FLOOR, figures
    assert figures["structure_iou"] >= STEERING_IOU_FLOOR, figures
    # Not asserted: keeping more of the layout than re-prompting.  With the benchmark's 64+64
    # direction images MedSteer leads on 50 scenes (structure IoU 0.133 vs 0.080) by 2.2 paired
    # bootstrap spreads, short of three.
