"""The built-in model's training script: seeded, resumable, atomic, and its export loads back.

Only a few steps with tiny batches run here: the real training never runs in CI."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines import models, train_builtin

MICRO = ["--vae-steps", "3", "--vae-batch", "2", "--steps", "4", "--batch", "2", "--warmup", "2",
         "--checkpoint-every", "2", "--scale-images", "8"]


def _run(tmp_path, name, extra=()):
    work, output = tmp_path / name, tmp_path / f"{name}_model"
    assert train_builtin.main(["--work", str(work), "--output", str(output), *MICRO, *extra]) == 0
    return work, output


def test_a_step_of_data_depends_only_on_seed_and_step():
    images, texts = train_builtin.scene_batch(7, 4, 0, "denoiser")
    again, again_texts = train_builtin.scene_batch(7, 4, 0, "denoiser")
    assert torch.equal(images, again) and texts == again_texts
    other, _ = train_builtin.scene_batch(8, 4, 0, "denoiser")
    assert not torch.equal(images, other)
    assert images.shape == (4, 3, 64, 64) and images.min() >= -1 and images.max() <= 1


def test_resume_continues_from_the_checkpoint_bit_for_bit(tmp_path, monkeypatch):
    straight, _ = _run(tmp_path, "straight")
    # Crash right after the step-2 checkpoint, then rerun the same command.
    crashing = tmp_path / "crashing"
    original = train_builtin.save_atomic
    calls = {"n": 0}

    def save_then_crash(state, path):
        original(state, path)
        if path.name == "denoiser.pt":
            calls["n"] += 1
            raise KeyboardInterrupt

    monkeypatch.setattr(train_builtin, "save_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_builtin.main(["--work", str(crashing), "--output", str(tmp_path / "x"), *MICRO])
    monkeypatch.setattr(train_builtin, "save_atomic", original)
    assert torch.load(crashing / "denoiser.pt", weights_only=False)["step"] == 2
    assert train_builtin.main(["--work", str(crashing), "--output", str(tmp_path / "y"), *MICRO]) == 0
    a = torch.load(straight / "denoiser.pt", weights_only=False)
    b = torch.load(crashing / "denoiser.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for part in ("unet", "text_encoder"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    # Checkpoints are replaced atomically: no temporary file is left beside them.
    assert sorted(p.name for p in crashing.iterdir()) == ["denoiser.pt", "train.log", "vae.pt"]


def test_export_is_a_float16_diffusers_folder_that_loads_in_float32(tmp_path):
    _work, output = _run(tmp_path, "run")
    card = json.loads((output / "training.json").read_text())
    assert card["denoiser_steps"] == 4 and "final_mse" in card
    assert not list(output.rglob("*.bin"))
    pipe = models.load(str(output), device="cpu")
    assert pipe.unet.dtype == torch.float32
    assert pipe.vae_scale_factor == 4 and models.default_size(pipe) == (64, 64)
    assert models.generation_defaults(pipe) == {
        "steps": train_builtin.INFERENCE_DEFAULTS["num_inference_steps"],
        "guidance": train_builtin.INFERENCE_DEFAULTS["guidance_scale"],
    }
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
