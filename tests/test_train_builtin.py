"""The built-in model's training script: seeded, resumable, atomic, and its export loads back.

Only a few steps with tiny batches run here: the real training never runs in CI.  One
uninterrupted run (`straight`, module-scoped) serves every test that needs a trained model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pipelines import models
from pipelines.builtin import train as train_builtin

STEPS, WARMUP, VAE_STEPS = 4, 2, 3
MICRO = ["--vae-steps", str(VAE_STEPS), "--vae-batch", "2", "--steps", str(STEPS), "--batch", "2",
         "--warmup", str(WARMUP), "--checkpoint-every", "2", "--scale-images", "8"]
LR, VAE_LR, EMA = 6e-4, 1e-3, 0.998  # the script's defaults, which MICRO keeps


def _run(tmp_path, name, extra=()):
    work, output = tmp_path / name, tmp_path / f"{name}_model"
    assert train_builtin.main(["--work", str(work), "--output", str(output), *MICRO, *extra]) == 0
    return work, output


def _warmup_cosine(step: int, total: int, warmup: int, peak: float) -> float:
    """The rate of step `step` (from 0): linear from 0 over `warmup` steps, then a half cosine to 0."""
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run, and the learning rate each optimizer step of each stage used."""
    rates = []  # one list per optimizer, in the order they are made: the VAE's, the denoiser's

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rates = []
            rates.append(self.rates)

        def step(self, closure=None):
            self.rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim, "AdamW", Recording)
        work, output = _run(tmp_path_factory.mktemp("train"), "straight")
    assert len(rates) == 2
    return SimpleNamespace(work=work, output=output, vae_rates=rates[0], denoiser_rates=rates[1])


def _checkpoints(work):
    return {name: torch.load(work / name, weights_only=False) for name in ("vae.pt", "denoiser.pt")}


def _assert_equal(a, b, where=""):
    """Nested dicts, lists and tuples of tensors and plain values, compared bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _ema_weights(checkpoint: dict) -> dict:
    """{"unet": {name: tensor}, "text_encoder": {...}}: the checkpoint's EMA, named as the model's."""
    weights = {}
    for part, module in (("unet", train_builtin.build_unet()), ("text_encoder", train_builtin.build_text_encoder())):
        ema = train_builtin.restore_ema(module, checkpoint["ema"][part], EMA)
        weights[part] = {name: shadow for (name, _), shadow in zip(module.named_parameters(), ema.shadow_params)}
    return weights


def test_a_step_of_data_depends_only_on_seed_and_step():
    images, texts = train_builtin.scene_batch(7, 4, 0, "denoiser")
    again, again_texts = train_builtin.scene_batch(7, 4, 0, "denoiser")
    assert torch.equal(images, again) and texts == again_texts
    other, _ = train_builtin.scene_batch(8, 4, 0, "denoiser")
    assert not torch.equal(images, other)
    assert images.shape == (4, 3, 64, 64) and images.min() >= -1 and images.max() <= 1


def test_the_learning_rate_warms_up_linearly_then_follows_a_half_cosine_to_zero(straight):
    # The schedule itself, over a length where its shape shows.
    total, warmup, peak = 20, 5, 1e-3
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = train_builtin.lr_schedule(optimizer, total, warmup)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([_warmup_cosine(k, total, warmup, peak) for k in range(total)], rel=1e-12, abs=1e-15)
    assert rates[0] == 0 and rates[warmup] == pytest.approx(peak) and max(rates) == rates[warmup]
    assert all(a < b for a, b in zip(rates[:warmup], rates[1:warmup + 1]))  # rising to the peak
    assert all(a > b for a, b in zip(rates[warmup:], rates[warmup + 1:]))  # then falling
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-15)  # 0 after the last step
    # What the training actually used, step by step, in both stages.
    assert straight.denoiser_rates == pytest.approx([_warmup_cosine(k, STEPS, WARMUP, LR) for k in range(STEPS)])
    assert straight.vae_rates == pytest.approx(
        [_warmup_cosine(k, VAE_STEPS, train_builtin.VAE_WARMUP, VAE_LR) for k in range(VAE_STEPS)])


def test_the_ema_copies_the_first_update_then_decays_by_n_over_n_plus_9_up_to_its_cap():
    module = torch.nn.Linear(1, 1, bias=False)
    for cap in (EMA, 0.3):
        with torch.no_grad():
            module.weight.fill_(-1.0)
        ema = train_builtin.make_ema(module, cap)
        expected = None
        for n in range(1, 8):
            with torch.no_grad():
                module.weight.fill_(float(n))
            ema.step(module.parameters())
            decay = 0.0 if n == 1 else min(cap, n / (n + 9))
            assert ema.cur_decay_value == pytest.approx(decay)
            expected = float(n) if expected is None else decay * expected + (1 - decay) * n
            assert ema.shadow_params[0].item() == pytest.approx(expected, rel=1e-6)
        assert ema.state_dict()["optimization_step"] == 7


def test_resume_continues_from_the_checkpoint_bit_for_bit(straight, tmp_path, monkeypatch):
    # Crash right after the first checkpoint of each stage (VAE step 2, denoiser step 2) and rerun
    # the same command each time.
    crashing = tmp_path / "crashing"
    original = train_builtin.save_atomic
    crashed = []

    def save_then_crash(state, path):
        original(state, path)
        if path.name not in crashed:
            crashed.append(path.name)
            raise KeyboardInterrupt

    monkeypatch.setattr(train_builtin, "save_atomic", save_then_crash)
    command = ["--work", str(crashing), "--output", str(tmp_path / "resumed_model"), *MICRO]
    for stage in ("vae.pt", "denoiser.pt"):
        with pytest.raises(KeyboardInterrupt):
            train_builtin.main(command)
        assert crashed[-1] == stage and torch.load(crashing / stage, weights_only=False)["step"] == 2
    assert train_builtin.main(command) == 0
    a, b = _checkpoints(straight.work), _checkpoints(crashing)
    assert a["vae.pt"]["step"] == b["vae.pt"]["step"] == VAE_STEPS
    assert a["denoiser.pt"]["step"] == b["denoiser.pt"]["step"] == STEPS
    # The VAE's running loss (a log figure, not training state) restarts at a resume.
    a["vae.pt"].pop("loss"), b["vae.pt"].pop("loss")
    for name in a:  # weights, optimizer, learning-rate schedule, EMAs and loss history, bit for bit
        _assert_equal(a[name], b[name], name)
    assert b["denoiser.pt"]["ema"]["unet"]["optimization_step"] == STEPS
    assert b["denoiser.pt"]["lr_scheduler"]["last_epoch"] == STEPS
    # The model written at the end is the same too.
    for file in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        _assert_equal(load_file(straight.output / file), load_file(tmp_path / "resumed_model" / file), file)
    # Checkpoints are replaced atomically: no temporary file is left beside them.
    assert sorted(p.name for p in crashing.iterdir()) == ["denoiser.pt", "train.log", "vae.pt"]


def test_the_model_written_holds_the_ema_weights_not_the_last_ones(straight):
    checkpoint = torch.load(straight.work / "denoiser.pt", weights_only=False)
    ema = _ema_weights(checkpoint)
    for part, file in (("unet", "unet/diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "text_encoder/model.safetensors")):
        written = load_file(straight.output / file)
        assert written.keys() == ema[part].keys() == checkpoint[part].keys(), part
        for name, tensor in written.items():
            assert tensor.dtype == torch.float16 and torch.equal(tensor, ema[part][name].half()), (part, name)
        # The EMA lags the last weights, so the two differ wherever training moved a weight.
        moved = [name for name in written if not torch.equal(ema[part][name], checkpoint[part][name])]
        assert len(moved) > len(written) // 2, part
        assert any(not torch.equal(written[name], checkpoint[part][name].half()) for name in moved), part


def test_export_only_writes_the_ema_too_and_refuses_checkpoints_of_the_old_script(straight, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("vae.pt", "denoiser.pt"):
        (work / name).write_bytes((straight.work / name).read_bytes())
    output = tmp_path / "snapshot"
    assert train_builtin.main(["--work", str(work), "--output", str(output), *MICRO, "--export-only"]) == 0
    for file in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        _assert_equal(load_file(straight.output / file), load_file(output / file), file)
    # The old hand-written EMA stored {module: state_dict}: not silently exported as fresh weights.
    old = torch.load(work / "denoiser.pt", weights_only=False)
    old["ema"] = {part: dict(old[part]) for part in ("unet", "text_encoder")}
    del old["lr_scheduler"]
    torch.save(old, work / "denoiser.pt")
    with pytest.raises(SystemExit, match="older version"):
        train_builtin.main(["--work", str(work), "--output", str(tmp_path / "no"), *MICRO, "--export-only"])
    with pytest.raises(SystemExit, match="older version"):
        train_builtin.main(["--work", str(work), "--output", str(tmp_path / "no"), *MICRO])
    assert not (tmp_path / "no").exists()


def test_exporting_over_a_model_folder_keeps_its_model_card(straight, tmp_path):
    """The documented command writes into assets/builtin, whose README.md (the model card) is
    written by hand; an export replaces the weights and training.json, never the card."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("vae.pt", "denoiser.pt"):
        (work / name).write_bytes((straight.work / name).read_bytes())
    output = tmp_path / "model"
    output.mkdir()
    (output / "README.md").write_text("# the card\n")
    (output / "stale.json").write_text("{}")
    assert train_builtin.main(["--work", str(work), "--output", str(output), *MICRO, "--export-only"]) == 0
    assert (output / "README.md").read_text() == "# the card\n"
    assert not (output / "stale.json").exists() and (output / "training.json").is_file()


def test_min_snr_weights_are_min_snr_gamma_over_snr():
    scheduler = train_builtin.train_scheduler()
    timesteps = torch.arange(scheduler.config.num_train_timesteps)
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = train_builtin.min_snr_weights(scheduler, timesteps)
    expected = torch.clamp(snr, max=train_builtin.MIN_SNR_GAMMA) / snr
    assert torch.allclose(weights, expected, rtol=1e-6, atol=0)
    assert weights.max() <= 1 and bool((weights[snr <= train_builtin.MIN_SNR_GAMMA] == 1).all())
    assert weights[0] == pytest.approx(train_builtin.MIN_SNR_GAMMA / snr[0].item(), rel=1e-6)


def test_export_is_a_float16_diffusers_folder_that_loads_in_float32(straight):
    output = straight.output
    card = json.loads((output / "training.json").read_text())
    assert card["denoiser_steps"] == STEPS and "final_mse" in card
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
