"""The per-video fine-tune of the inflated UNet (Tune-A-Video's, as ReAtCo's configs run it).

Trainable: every ``attn1.to_q``, ``attn2.to_q`` and the temporal attention modules
(``attn_temp``; their LayerNorm ``norm_temp`` stays at its initialisation, as in Tune-A-Video).
On a motion UNet (AnimateDiff, pipelines/video/motion.py; no fine-tune unless asked for) the
spatial q projections and the motion modules' attention (`motion.trainable_parameters`).
Loss: DDPM's epsilon (or velocity, for v-prediction models) MSE of the clip's latents noised at
one random timestep, with the SOURCE prompt; VAE and text encoder frozen.  AdamW (Tune-A-Video's
defaults: betas 0.9/0.999, weight decay 0.01, eps 1e-8), constant learning rate.

accelerate runs it: `Accelerator(mixed_precision=...)` (autocast and, for fp16, gradient
scaling) and, under ``accelerate launch``, several processes, each drawing its own noise, with the
gradients averaged (`accelerator.reduce`).  The master weights stay float32: a model loaded in
half precision is fine-tuned on a float32 copy (the copy `inflate` made is ours) and cast back
for sampling.  Gradient checkpointing is diffusers' `enable_gradient_checkpointing` on that copy.

Caching and resuming: the run lives in one folder (`TuneCache`), keyed by (model fingerprint,
clip hash, source prompt, every setting that changes the weights).  A finished run leaves
``tuned.safetensors`` (the trainable tensors, `pipelines.io.save_tensors`); a re-edit of the same
clip loads it and skips training.  While it runs, ``checkpoint.pt`` (trainable tensors,
optimiser state, generator state, step, losses) is written atomically every
`checkpoint_every` steps and when stopped, and a new run with the same key resumes from it,
bit-identically on the same machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserInputError, out_of_memory_message
from ..io import load_tensors, save_tensors, save_torch
from ..stopping import Stopped
from . import motion
from .inflate import sparse_causal_layers, video_call

TRAINABLE_SUFFIXES = ("attn1.to_q", "attn2.to_q", "attn_temp")
TUNED_FILE, CHECKPOINT_FILE = "tuned.safetensors", "checkpoint.pt"
TUNED_FORMAT = "video-tune/1"
ADAM = dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def trainable_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of the modules the fine-tune trains (see the module docstring)."""
    if motion.motion_record(unet) is not None:
        return motion.trainable_parameters(unet)
    out = {}
    for name, module in unet.named_modules():
        if name.endswith(TRAINABLE_SUFFIXES):
            for pname, p in module.named_parameters():
                out[f"{name}.{pname}"] = p
    return out


def model_fingerprint(pipe) -> str:
    """A short hash of the model: its name, the UNet's config, and a few of its weights."""
    unet = pipe.unet
    digest = hashlib.sha256()
    digest.update(str(getattr(pipe, "name_or_path", "") or "").encode())
    digest.update(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    params = list(unet.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class TuneCache:
    folder: Path
    fingerprint: dict

    @property
    def tuned(self) -> Path:
        return self.folder / TUNED_FILE

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT_FILE


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "fp16" if device.type == "cuda" else "no"
    if name == "fp16" and device.type != "cuda":
        raise UserInputError("fp16 mixed precision needs a CUDA GPU; use mixed precision 'no' or 'bf16' here.")
    return name


def load_tuned(unet, cache: TuneCache) -> bool:
    """Load the cached fine-tuned tensors into `unet` if the run finished before; True if so."""
    if not cache.tuned.is_file():
        return False
    tensors, meta = load_tensors(cache.tuned, TUNED_FORMAT, "fine-tuned video weights", "Edit video's fine-tune")
    if json.loads(meta.get("fingerprint", "{}")) != cache.fingerprint:
        raise UserInputError(f"The cache folder '{cache.folder}' holds another fine-tune; remove it to start over.")
    params = trainable_parameters(unet)
    if set(tensors) != set(params):
        raise UserInputError(f"The cached fine-tune in '{cache.folder}' does not fit this model; remove it.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return True


class VideoTuner:
    """One fine-tune run of `unet` (inflated, ours) on a clip's VAE latent distribution.

    mean, std: (1, C, F, h, w) of the VAE posterior (scaled latents are (mean + std * eps) * s);
    text: (1, L, D) source-prompt embeddings; `settings` a validated `VideoSettings`.
    """

    def __init__(self, pipe, unet, mean, std, text, settings, cache: TuneCache | None, device):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler

        from attention_processors.video import SparseCausalAttention

        self.unet, self.settings, self.cache, self.device = unet, settings, cache, device
        self.scaling = float(pipe.vae.config.scaling_factor)
        self.mean, self.std, self.text = mean.float(), std.float(), text.float()
        precision = resolve_precision(settings.mixed_precision, device)
        self.accelerator = Accelerator(mixed_precision=precision, cpu=device.type != "cuda")
        self.params = trainable_parameters(unet)
        for p in self.params.values():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(list(self.params.values()), lr=settings.tune_lr, **ADAM)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config)
        self.generator = torch.Generator().manual_seed(settings.seed + self.accelerator.process_index)
        self.step, self.resumed_from, self.losses = 0, 0, []
        self.controller = SparseCausalAttention(sparse_causal_layers(unet))
        if settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

    @property
    def total(self) -> int:
        return self.settings.fine_tune_steps()

    def try_resume(self) -> bool:
        if self.cache is None or not self.cache.checkpoint.is_file():
            return False
        try:
            state = torch.load(self.cache.checkpoint, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 (a damaged checkpoint is one sentence)
            if out_of_memory_message(error):  # a full memory is not a damaged checkpoint: keep it
                raise
            raise UserInputError(f"The fine-tune checkpoint in '{self.cache.folder}' is not readable; remove it.") \
                from error
        if state.get("fingerprint") != self.cache.fingerprint:
            raise UserInputError(f"The cache folder '{self.cache.folder}' holds another fine-tune; remove it.")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.losses = list(state["losses"])
        self.step = self.resumed_from = int(state["step"])
        return True

    def save_checkpoint(self) -> None:
        if self.cache is None or not self.accelerator.is_main_process:
            return
        state = {"fingerprint": self.cache.fingerprint, "step": self.step, "losses": list(self.losses),
                 "params": {k: p.detach().cpu().clone() for k, p in self.params.items()},
                 "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}
        save_torch(state, self.cache.checkpoint, f"the fine-tune checkpoint of step {self.step}")

    def save_tuned(self) -> None:
        if self.cache is None or not self.accelerator.is_main_process:
            return
        save_tensors(self.cache.tuned, {k: p.detach() for k, p in self.params.items()},
                     {"format": TUNED_FORMAT, "fingerprint": json.dumps(self.cache.fingerprint, sort_keys=True),
                      "steps": str(self.step)}, "fine-tuned video weights")
        self.cache.checkpoint.unlink(missing_ok=True)

    def one_step(self) -> float:
        frames = self.mean.shape[2]
        run = self.settings.tune_run(frames)
        start = int(torch.randint(0, frames - run + 1, (1,), generator=self.generator))
        eps = torch.randn(self.mean[:, :, start:start + run].shape, generator=self.generator)
        mean, std = self.mean[:, :, start:start + run], self.std[:, :, start:start + run]
        latents = ((mean.cpu() + std.cpu() * eps) * self.scaling).to(self.device)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (1,), generator=self.generator).to(self.device)
        noisy = self.noise.add_noise(latents, noise, t)
        if self.noise.config.prediction_type == "v_prediction":
            target = self.noise.get_velocity(latents, noise, t)
        else:
            target = noise
        with self.accelerator.autocast():
            pred = self.unet(noisy, t, encoder_hidden_states=self.text.to(self.device)).sample
        loss = F.mse_loss(pred.float(), target.float())
        self.accelerator.backward(loss)
        if self.accelerator.num_processes > 1:
            for p in self.params.values():
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def run(self, progress: Callable | None = None, stop: Callable[[], bool] | None = None) -> None:
        """Train from the current (or resumed) step to `fine_tune_steps()`; a stop writes a checkpoint and
        raises `Stopped` (the next run with the same key resumes there)."""
        self.try_resume()
        every = self.settings.checkpoint_every
        try:
            with video_call(self.unet, self.controller), torch.enable_grad():
                while self.step < self.total:
                    if stop is not None and stop():
                        self.save_checkpoint()
                        raise Stopped(self.step, self.total, "fine-tune step")
                    loss = self.one_step()
                    if progress is not None:
                        progress("fine-tune", self.step, self.total, loss)
                    if self.step % every == 0 and self.step < self.total:
                        self.accelerator.wait_for_everyone()
                        self.save_checkpoint()
            self.save_tuned()
        finally:
            for p in self.params.values():
                p.requires_grad_(False)
                p.grad = None
            if self.settings.gradient_checkpointing:
                self.unet.disable_gradient_checkpointing()
