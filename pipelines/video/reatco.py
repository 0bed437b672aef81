"""ReAtCo's sampling loop on a video UNet (the inflated one, or AnimateDiff's motion UNet: the
same code, run inside `inflate.video_call`): windows, DDIM inversion, RAD and IRJS.

- **Windows** (`windows`, `windowed`): views (a, a + W) with stride s (a last view ending at F
  is added when the stride does not reach it); each view is processed on its own frame slice and
  the results of overlapping frames are averaged (MultiDiffusion style).  Memory is bounded by
  the window.  A clip of at most W frames is one view: exactly the unwindowed computation.
  Sparse-causal attention anchors on each window's first frame.
- **Inversion** (`invert`): plain DDIM inversion (diffusers' `DDIMInverseScheduler`) with the
  empty prompt and no guidance, windowed like sampling.
- **RAD** (`Sampler.rad_update`): on steps i < rad_last and on the refinement steps, a
  conditional-only forward with gradients (edited prompt) captures the cross-attention
  probabilities of the capture layers, `box_loss` gives L and L_max, and z moves down their
  gradients: first, on a refinement step with threshold theta, z <- z - alpha_i grad L_max while
  L_max > 1 - theta (at most `refine_iterations` times), then, when i < rad_last,
  z <- z - alpha_i grad L, with alpha_i = scale * sqrt(s_i), s = linspace(1, 0.5, steps).  The
  loss evaluated last in the refinement loop is the loss at the refined z, so its graph serves the
  main update (the reference recomputes it: one forward fewer, the same value).  The forward
  stops right after the block holding the last capture layer (nothing after it feeds the loss).
  No gradient pass runs on the other steps.
- **IRJS** (`Sampler.model_input`): at every step a fresh seeded eps_i (one draw for the whole
  clip, so overlapping views see the same noise) re-noises the source latents,
  x_t^src = add_noise(x0_src, eps_i, t), and the model input is M * z + (1 - M) * x_t^src, M = 1
  inside the union of the boxes (latent cells the boxes touch, per frame).  The guided DDIM step
  runs on that input; there is no paste after the step.
- **Preview** (`Sampler.run`'s `preview`, `preview_steps`): after a few editing steps (at most
  `PREVIEWS`, spread evenly, never the last: the result follows it) the model's current estimate
  of the clean clip, the DDIM x0 prediction of every view averaged like the steps, is handed to
  `preview(step, total, x0)`.  Without `preview` nothing of it is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from attention_processors import layers as vocabulary
from attention_processors.core import attention_layer_names
from attention_processors.video import ReAtCoAttention, box_loss

from ..stopping import Stopped
from .inflate import self_attention_layers


def windows(frames: int, window: int, stride: int = 1) -> list[tuple[int, int]]:
    """The views (start, end) over `frames` frames (see the module docstring)."""
    if frames <= window:
        return [(0, frames)]
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return [(a, a + window) for a in starts]


def windowed(latents: torch.Tensor, views: list[tuple[int, int]],
             step: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`step(a, b, latents[:, :, a:b])` on every view, overlapping frames averaged."""
    if len(views) == 1 and views[0] == (0, latents.shape[2]):
        return step(0, latents.shape[2], latents)
    total = torch.zeros_like(latents)
    count = torch.zeros(latents.shape[2], device=latents.device, dtype=latents.dtype)
    for a, b in views:
        total[:, :, a:b] += step(a, b, latents[:, :, a:b])
        count[a:b] += 1
    if bool((count == 0).any()):
        raise ValueError("the views leave some frames out")
    return total / count.view(1, 1, -1, 1, 1)


def capture_layers(unet) -> tuple[list[str], int]:
    """RAD's capture layers and their UNet level.

    The paper reads every cross-attention at 1/32 of the image (SD 1.x: ``down_blocks.2`` and
    ``up_blocks.1``, 5 layers), which on SD 1.x/2.x is the deepest level with cross-attention in
    the encoder and decoder (the mid block excluded).  We take that rule on every UNet: on
    `builtin` and the tiny models (VAE factor 4 or 8, cross-attention at latent/1 and latent/2)
    it picks the latent/2 layers of ``down_blocks.1`` and ``up_blocks.1`` (3 layers).  On a motion
    UNet the same spatial layers: the vocabulary does not parse the motion modules' attention.
    """
    names = attention_layer_names(unet)
    depth, up = len(unet.down_blocks), len(unet.up_blocks)
    sections = [layer for layer in vocabulary.parse_all(vocabulary.cross_attention(names)) if layer.section != "mid"]
    if not sections:
        raise ValueError("this UNet has no cross-attention outside its mid block")
    level = max(layer.level(depth, up) for layer in sections)
    chosen = vocabulary.cross_attention(names, section=("down", "up"), level=level, unet_depth=depth, up_depth=up)
    return chosen, level


class _CaptureDone(Exception):
    """Raised after the block holding the last capture layer: the gradient forward may stop."""


def _capture_done(module, args, output):
    """The early exit's forward hook.  Eager only: inside a graph compiled around the whole UNet an
    exception is a graph break, so there the forward runs to its end (as RefAM's early exit)."""
    if not torch.compiler.is_compiling():
        raise _CaptureDone


def _last_capture_block(unet, layers: list[str]):
    last = vocabulary.parse(vocabulary.execution_order(layers)[-1])
    name = "mid_block" if last.section == "mid" else f"{last.section}_blocks.{last.block}"
    return unet.get_submodule(name)


def invert(unet, controller, x0: torch.Tensor, uncond: torch.Tensor, scheduler_config, steps: int,
           views: list[tuple[int, int]], progress: Callable | None = None,
           stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """z_T of plain DDIM inversion of x0 (1, C, F, h, w): empty prompt, no guidance, windowed.
    Runs inside `video_call(unet, controller)`."""
    from diffusers import DDIMInverseScheduler

    import inspect

    known = inspect.signature(DDIMInverseScheduler.__init__).parameters
    inverse = DDIMInverseScheduler.from_config({k: v for k, v in dict(scheduler_config).items()
                                                if k in known or k.startswith("_")})
    inverse.set_timesteps(steps, device=x0.device)
    controller.state.row_roles = ("cond",)
    z = x0
    with torch.no_grad():
        for i, t in enumerate(inverse.timesteps):
            if stop is not None and stop():
                raise Stopped(i, steps, "inversion step")

            def one(a, b, zv, t=t):
                eps = unet(zv, t, encoder_hidden_states=uncond).sample
                return inverse.step(eps, t, zv).prev_sample

            z = windowed(z, views, one)
            if progress is not None:
                progress("inversion", i + 1, steps, None)
    return z


@dataclass
class Sampler:
    """One ReAtCo sampling run (see the module docstring); built by `pipelines.video.edit`.

    x0: (1, C, F, h, w) source latents; z_T: the inverted start; cond / uncond: (1, L, D) edited
    prompt and empty prompt; tokens: per target, its token positions; inside: (K, F, gh, gw)
    bool box masks on the capture grid; irjs_mask: (F, h, w) float, 1 inside the box union.
    """

    unet: object
    controller: ReAtCoAttention
    scheduler: object  # a fresh DDIMScheduler with its timesteps set
    settings: object
    x0: torch.Tensor
    z_T: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    tokens: list[list[int]]
    inside: torch.Tensor | None
    irjs_mask: torch.Tensor | None
    views: list[tuple[int, int]]
    generator: torch.Generator
    model_inputs: list[torch.Tensor] = field(default_factory=list)  # filled when `record_inputs`
    record_inputs: bool = False
    losses: list[dict] = field(default_factory=list)  # per RAD evaluation: step, view, L, L_max
    gradient_passes: int = 0

    def __post_init__(self):
        s, steps = self.settings, self.settings.steps
        self.alphas = [s.rad_scale * math.sqrt(v) for v in torch.linspace(1.0, s.RAD_END, steps).tolist()]
        self.refine = s.refine_thresholds()
        self.rad_last = s.rad_last_step()
        self._exit_block = _last_capture_block(self.unet, sorted(self.controller.capture_layers))

    # ------------------------------------------------------------------ RAD

    def rad_due(self, i: int) -> bool:
        return bool(self.settings.rad and self.tokens and (i < self.rad_last or i in self.refine))

    def loss_at(self, z: torch.Tensor, t, a: int, b: int):
        """(L, L_max, parts) of RAD at z (a view of frames a..b), with z's graph."""
        state = self.controller.state
        state.row_roles = ("cond",)

        handle = self._exit_block.register_forward_hook(_capture_done)
        try:
            self.unet(z, t, encoder_hidden_states=self.cond)
        except _CaptureDone:
            pass
        finally:
            handle.remove()
        self.gradient_passes += 1
        maps = self.controller.attention_maps()  # (frames, N, 77)
        gh, gw = self.inside.shape[-2:]
        maps = maps.view(b - a, gh, gw, maps.shape[-1])
        s = self.settings
        return box_loss(maps, self.tokens, self.inside[:, a:b].to(maps.device), topk=s.topk,
                        temperature=s.temperature, sigma=s.smoothing)

    def rad_update(self, z: torch.Tensor, i: int, t, a: int, b: int) -> torch.Tensor:
        alpha, theta = self.alphas[i], self.refine.get(i)
        self.controller.capturing = True
        try:
            with torch.enable_grad():
                iterations = 0
                while True:
                    z = z.detach().requires_grad_(True)
                    loss, loss_max, parts = self.loss_at(z, t, a, b)
                    self.losses.append({"step": i, "view": a, "L": float(loss.detach()),
                                        "L_max": float(loss_max.detach()),
                                        "refine": iterations})
                    if theta is None or float(loss_max.detach()) <= 1 - theta or iterations >= self.settings.refine_iterations:
                        break
                    (grad,) = torch.autograd.grad(loss_max, z)
                    z = z - alpha * grad
                    iterations += 1
                if i < self.rad_last:
                    (grad,) = torch.autograd.grad(loss, z)
                    z = z - alpha * grad
        finally:
            self.controller.capturing = False
        return z.detach()

    # ------------------------------------------------------------------ IRJS and the guided step

    def model_input(self, z: torch.Tensor, source_t: torch.Tensor, a: int, b: int) -> torch.Tensor:
        if not self.settings.preserve_background or self.irjs_mask is None:
            return z
        m = self.irjs_mask[a:b].to(z.device, z.dtype).view(1, 1, b - a, *z.shape[-2:])
        return m * z + (1 - m) * source_t[:, :, a:b]

    def guided_output(self, z_in: torch.Tensor, t, start: int):
        """The scheduler's output of the guided DDIM step (`prev_sample`, `pred_original_sample`) of
        the view whose first clip frame is `start` (where its heatmaps go)."""
        state = self.controller.state
        state.row_roles = ("uncond", "cond")
        with torch.no_grad():
            eps = self.unet(torch.cat([z_in, z_in]), t,
                            encoder_hidden_states=torch.cat([self.uncond, self.cond])).sample
        self.controller.fold_heat(start)
        e_u, e_c = eps.chunk(2)
        guided = e_u + self.settings.guidance * (e_c - e_u)
        return self.scheduler.step(guided, t, z_in)

    def run(self, progress: Callable | None = None, stop: Callable[[], bool] | None = None,
            preview: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """The edited latents.  `progress("edit", done, total, loss)` after every step; `stop()` before
        every step; `preview(done, total, x0)` after the `preview_steps`, x0 (1, C, F, h, w) the x0
        prediction of that step (not called when a stop is pending: the next step raises)."""
        latents = self.z_T
        steps = len(self.scheduler.timesteps)
        previews = set(preview_steps(steps)) if preview is not None else set()
        for i, t in enumerate(self.scheduler.timesteps):
            if stop is not None and stop():
                raise Stopped(i, steps, "editing step")
            noise = torch.randn(self.x0.shape, generator=self.generator).to(self.x0.device, self.x0.dtype)
            source_t = self.scheduler.add_noise(self.x0, noise, t.reshape(1))
            # the x0 prediction, summed over the views and counted per frame (only on a preview step)
            estimate = (torch.zeros_like(latents), [0] * latents.shape[2]) if i + 1 in previews else None

            def one(a, b, z, i=i, t=t, source_t=source_t, estimate=estimate):
                if self.rad_due(i):
                    z = self.rad_update(z, i, t, a, b)
                z_in = self.model_input(z, source_t, a, b)
                if self.record_inputs:
                    self.model_inputs.append((i, a, z_in.detach().clone(), source_t[:, :, a:b].clone()))
                out = self.guided_output(z_in, t, a)
                if estimate is None:
                    return out.prev_sample
                estimate[0][:, :, a:b] += out.pred_original_sample
                for f in range(a, b):
                    estimate[1][f] += 1
                return out.prev_sample

            latents = windowed(latents, self.views, one)
            if progress is not None:
                progress("edit", i + 1, steps, self.losses[-1]["L"] if self.losses and self.losses[-1]["step"] == i
                         else None)
            if estimate is not None and not (stop is not None and stop()):
                total, count = estimate
                counts = torch.tensor(count, device=total.device, dtype=total.dtype).view(1, 1, -1, 1, 1)
                preview(i + 1, steps, total / counts)
        return latents


#: at most this many previews per edit (each costs a VAE decode of a few frames)
PREVIEWS = 5


def preview_steps(steps: int, count: int = PREVIEWS) -> list[int]:
    """The editing steps (counted from 1) after which `Sampler.run` makes a preview: at most `count`,
    spread evenly over the run, never after the last step (the decoded result follows it at once)."""
    return sorted({round(steps * j / (count + 1)) for j in range(1, count + 1)} - {0, steps})


def default_views(frames: int, settings) -> list[tuple[int, int]]:
    return windows(frames, settings.window, settings.window_stride)


__all__ = ["PREVIEWS", "Sampler", "capture_layers", "default_views", "invert", "preview_steps", "self_attention_layers",
           "windowed", "windows"]
