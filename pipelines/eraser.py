"""The "Remove object" task: Attentive Eraser (AAS self-attention redirection + SARG guidance).

Method notes: docs/methods/eraser.md.  Training-free object removal on a plain text-to-image UNet
(SD 1.x, SD 2.x, SDXL): no prompt, no classifier-free guidance.  Every step runs the UNet once on
a doubled batch ``[normal, aas]`` with the same latents; the ``aas`` rows have AAS in their decoder
self-attentions (attention_processors.attentive_eraser), and SARG combines the two outputs:

    eps = eps_normal + s * (eps_aas - eps_normal)

Each step is diffusers' DDIM step (`DDIMScheduler`, eta 0, "leading" spacing, the model's betas
and prediction type, as the paper configures it: `DDIM_CONFIG`) on a scheduler made for this call;
the cached pipeline's own scheduler is only read.  The loop around the steps is written out here:

- SIP (default): encode the full image (object included), noise it once to the strength timestep
  and, after every DDIM step, paste the background back from the scheduler's
  ``add_noise(z0, noise, t_next)`` with the same noise, and ``z0`` itself after the last step.
- DIP: invert the image with `DDIMInverseScheduler` and the empty prompt, record the trajectory,
  denoise from its end and paste the background from the recorded latent before every UNet call.

Around the loop: the user mask is grown or shrunk (pixels), blurred and thresholded at 0.1 (a
soft dilation whose kernel scales with the image side), the image is cut to the region to process
(the whole image, or for a large photo a crop around the mask), scaled to the model's working
area, padded to the model's size multiple, and the result is composited back with a feathered
mask, so every pixel outside it equals the input exactly.  The output has the input's size.

Paper defaults live in one place, `EraserSettings` below (50 DDIM steps, strength 0.8, SARG
scale 9, SS on steps 0..9 with lambda 0.3, SIP; blur kernel 77 at 1024 px for SDXL); the CLI and
the tab derive their flags and controls from it.  Without settings, `erase` uses the model's
(`EraserSettings.for_model`): the paper's, except where a model folder ships measured defaults of
its own.  The built-in model does (strength 1.0, SARG scale 1, the fill prompt "an empty
background"): at 64 px AAS moves its output by about 3/255 in the mask, s = 9 amplifies that into
damage, SIP's 0.8 keeps the object, and the empty prompt lets it paint another object into the
hole (measurements in docs/methods/eraser.md).

Deliberate differences from the released code, all exact or our documented choices:
- AAS with one mask shared by every sample drops the masked keys instead of adding finfo.min
  (the same probabilities, exactly; SDPA keeps its fused kernels); SS runs on the in-mask query
  rows only.  A grid fully covered by the mask attends normally (the reference has no guard).
- Any size: the processed region (the whole image, or for large photos a crop around the mask)
  is scaled to the model's native area keeping its aspect ratio (the reference squashes to a
  square 1024 or 512), padded (mirrored) to the model's multiple, and pasted back.
- SD 1.x/2.x blur kernel: 13 at 512 px (the SD 2.1 scripts use 7 or 13); every kernel scales
  with the working side.  Feathering: a Gaussian of radius 15 px at 512 (kernel 2r + 1,
  OpenCV's sigma), computed at working size; always on (the SDXL pipeline has none).
- FreeU (the SD 2.1 scripts' values) is on by default for SD 2.x only.
- DIP takes `strength` too (default 1.0 = the paper); with less, the inversion stops at the
  strength timestep.  For v-prediction models the inversion converts v to noise at the timestep
  the model was told (`predicted_noise`), not at the earlier one the inverse scheduler would use.
- Latents stay float32 through the loop; each seed draws its VAE sample and its noise from its
  own CPU generator, so a seed gives the same result on any device and in any batch.
- s = 1 evaluates only the AAS rows and s = 0 only the normal rows (the same formula).
- A fill prompt (`fill_prompt`, ours; empty by default, which is the paper's method): both
  branches are conditioned on a prompt saying what the hole should hold instead of the empty
  prompt, as inpainting UIs let users do.  The built-in model's own default is "an empty
  background", because with the empty prompt it paints another object into the hole
  (docs/methods/eraser.md).
"""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler
from PIL import Image

from attention_processors import ControlState, attach
from attention_processors.attentive_eraser import AAS, NORMAL, AttentiveEraserAAS

from . import backbones, models
from .errors import UserInputError
from .io import load_image, load_mask, save_image
from .seeds import resolve_seed
from .tokenizers import check_fits
from .viz import overlay_mask
from .eraser_settings import (
    CROP_MODES,
    MAX_BLUR_KERNEL,
    MAX_GROW,
    EraserSettings,
)

logger = logging.getLogger(__name__)

#: A region larger than this many times the model's native area is cut around the mask.
CROP_AREA_FACTOR = 2.25
#: A region within this fraction of the native area's side is not rescaled.
RESAMPLE_TOLERANCE = 0.1
#: The paper's mask blur kernels: (kernel, at this image side).
BLUR_REFERENCE = {backbones.SDXL: (77, 1024), backbones.SD: (13, 512)}
SUPPORTED = (backbones.SD, backbones.SDXL)


#: Radius of the final feathering blur at 512 px (scaled with the side).
FEATHER_RADIUS_AT_512 = 15
#: FreeU as in the paper's SD 2.1 scripts.
FREEU_SD2 = {"s1": 0.9, "s2": 0.2, "b1": 1.4, "b2": 1.6}
#: DDIM as the released code configures it (betas come from the model, identical for SD/SDXL).
DDIM_CONFIG = {
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "thresholding": False,
}


# --------------------------------------------------------------------------------- backbones


@dataclass(frozen=True)
class EraserBackbone:
    """What the eraser needs to know about a model."""

    backbone: backbones.Backbone  # SD (1.x / 2.x) or SDXL
    sd2: bool
    native: int  # image side the model was trained at, px
    multiple: int  # working sizes are padded to this (VAE factor x UNet downsampling)

    def blur_kernel(self, side: float) -> int:
        """The mask blur kernel for a working image of this side (paper kernel, scaled)."""
        kernel, at = BLUR_REFERENCE[self.backbone]
        return _odd(kernel * side / at)


def backbone(pipe) -> EraserBackbone:
    fam = backbones.require(pipe, SUPPORTED, "Remove object")
    unet = pipe.unet
    if unet.config.in_channels != 4:
        raise UserInputError(
            "Remove object needs a plain text-to-image model; inpainting checkpoints "
            f"({unet.config.in_channels}-channel UNets) are not supported, use their base model."
        )
    sample = unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return EraserBackbone(fam, fam.is_v2(unet), int(sample) * fam.vae_factor(pipe), fam.grid_multiple(pipe))


def _odd(value: float) -> int:
    """The odd integer nearest to `value` (at least 1)."""
    return max(1, 2 * int(math.floor(value / 2)) + 1) if value >= 1 else 1


# ----------------------------------------------------------------------------------- masks


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow (pixels > 0) or shrink (< 0) a boolean mask by a disc of that radius."""
    if pixels == 0:
        return mask
    r = abs(int(pixels))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    op = cv2.dilate if pixels > 0 else cv2.erode
    return op(mask.astype(np.uint8), disc, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0


def dilate_mask(mask: np.ndarray, kernel: int) -> np.ndarray:
    """The paper's soft dilation: Gaussian blur (OpenCV's default sigma for `kernel`), > 0.1."""
    if kernel <= 1:
        return mask.copy()
    blurred = cv2.GaussianBlur(mask.astype(np.float32), (kernel, kernel), 0, borderType=cv2.BORDER_CONSTANT)
    return (blurred > 0.1) | mask


def feather_weights(mask: np.ndarray, radius: float) -> np.ndarray:
    """Composite weights m_f = 1 - (1 - m)(1 - G(m)): 1 on the mask, fading out over `radius`.

    Exactly 0 farther than the blur kernel reaches, so those pixels keep the input exactly.
    """
    m = mask.astype(np.float32)
    kernel = _odd(2 * radius + 1)
    if kernel <= 1:
        return m
    blurred = cv2.GaussianBlur(m, (kernel, kernel), 0, borderType=cv2.BORDER_CONSTANT)
    return 1.0 - (1.0 - m) * (1.0 - blurred)


# ---------------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class Region:
    """The part of the input that is processed, and the working size it is scaled to."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in input pixels
    size: tuple[int, int]  # (width, height) after scaling, before padding
    padded: tuple[int, int]  # (width, height) padded to the model's multiple
    cropped: bool

    @property
    def region_size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return x1 - x0, y1 - y0

    @property
    def side(self) -> float:
        """Working side (geometric mean of the scaled width and height)."""
        return math.sqrt(self.size[0] * self.size[1])


def plan_region(image_size: tuple[int, int], mask: np.ndarray, bb: EraserBackbone, crop: str = "auto",
                working_side: int | None = None) -> Region:
    """Where to work and at which size.

    The region (the whole image, or a crop around the mask) is scaled so that its area is the
    model's native area (``working_side`` squared), up or down, keeping its aspect ratio, then
    padded to the model's multiple.  crop="auto" crops when the image is more than
    `CROP_AREA_FACTOR` times the native area; the crop is at least native-sized and twice the
    mask's bounding box, so a small object in a large photo is processed at full resolution.
    """
    if crop not in CROP_MODES:
        raise UserInputError(f"Crop must be one of {', '.join(CROP_MODES)}, not {crop!r}.")
    width, height = image_size
    native = int(working_side or bb.native)
    box = (0, 0, width, height)
    cropped = False
    if crop == "always" or (crop == "auto" and width * height > CROP_AREA_FACTOR * native * native):
        ys, xs = np.nonzero(mask)
        bx0, bx1, by0, by1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        bw, bh = bx1 - bx0, by1 - by0
        # room for the dilation and for context: twice the box, at least the native side
        cw = min(width, max(native, 2 * bw, bw + native // 4))
        ch = min(height, max(native, 2 * bh, bh + native // 4))
        cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
        x0 = int(min(max(round(cx - cw / 2), 0), width - cw))
        y0 = int(min(max(round(cy - ch / 2), 0), height - ch))
        box = (x0, y0, x0 + cw, y0 + ch)
        cropped = box != (0, 0, width, height)
    rw, rh = box[2] - box[0], box[3] - box[1]
    scale = min(native / math.sqrt(rw * rh), 2 * native / max(rw, rh))
    if abs(scale - 1) < RESAMPLE_TOLERANCE:
        scale = 1.0  # close enough: padding alone, no resampling blur
    m = bb.multiple
    size = (max(m, round(rw * scale)), max(m, round(rh * scale)))
    padded = (math.ceil(size[0] / m) * m, math.ceil(size[1] / m) * m)
    return Region(box, size, padded, cropped)


@dataclass
class Prepared:
    """An image and mask made ready for the model (see `prepare`)."""

    image: Image.Image  # the input, RGB
    user_mask: np.ndarray  # bool (H, W): the user's mask after growing or shrinking
    region: Region
    work_image: np.ndarray  # uint8 (H_pad, W_pad, 3)
    work_mask: np.ndarray  # bool (H_pad, W_pad): the dilated mask the model uses
    mask: np.ndarray  # bool (H, W): the dilated mask at input size (includes user_mask)
    weights: np.ndarray  # float32 (h_region, w_region): composite weights m_f
    kernel: int
    feather_radius: float
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.user_mask.any()


def prepare(bb: EraserBackbone, image, mask, grow: int = 0, crop: str = "auto", blur_kernel: int | None = None,
            working_side: int | None = None) -> Prepared:
    """Validate the inputs and compute the working image, the dilated mask and the composite weights.

    An empty mask gives a `Prepared` with ``empty`` True and a note (nothing to remove); a mask
    covering the whole image raises `UserInputError`.
    """
    picture = load_image(image)
    user, note = load_mask(mask, size=picture.size)
    notes = [note] if note else []
    if not -MAX_GROW <= int(grow) <= MAX_GROW:
        raise UserInputError(f"Mask growth must be between -{MAX_GROW} and {MAX_GROW} pixels, not {grow}.")
    user = grow_mask(user, int(grow))
    width, height = picture.size
    if not user.any():
        notes.append("The mask is empty, so nothing was removed; paint over the object to remove.")
        region = Region((0, 0, width, height), (width, height), (width, height), False)
        zeros = np.zeros((height, width), bool)
        return Prepared(picture, user, region, np.asarray(picture), zeros, zeros,
                        np.zeros((height, width), np.float32), 1, 0.0, notes)
    if user.all():
        raise UserInputError(
            "The mask covers the whole image; leave some background for the model to rebuild the hole from."
        )
    if blur_kernel is not None and (int(blur_kernel) < 1 or int(blur_kernel) % 2 == 0 or blur_kernel > MAX_BLUR_KERNEL):
        raise UserInputError(f"The mask blur kernel must be an odd number from 1 to {MAX_BLUR_KERNEL}, not {blur_kernel}.")
    region = plan_region(picture.size, user, bb, crop, working_side)
    x0, y0, x1, y1 = region.box
    (w, h), (pw, ph) = region.size, region.padded
    rgb = np.asarray(picture)[y0:y1, x0:x1]
    user_region = user[y0:y1, x0:x1]
    if (w, h) != region.region_size:
        shrinking = w * h < user_region.size
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
        small = cv2.resize(user_region.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    else:
        small = user_region
    kernel = int(blur_kernel) if blur_kernel is not None else bb.blur_kernel(region.side)
    dilated = dilate_mask(small, kernel)
    if dilated.all():
        raise UserInputError(
            "After dilation the mask covers the whole image; paint a smaller mask or shrink it."
        )
    pad = ((0, ph - h), (0, pw - w))
    work_image = np.pad(rgb, pad + ((0, 0),), mode="symmetric")
    work_mask = np.pad(dilated, pad, mode="constant")
    # back at input resolution: the dilated mask (never smaller than the user's) and the
    # feathered weights, computed at working size and resized (exact zeros stay exact zeros)
    radius = FEATHER_RADIUS_AT_512 * region.side / 512
    weights = feather_weights(dilated, radius)
    rw, rh = region.region_size
    if (w, h) != (rw, rh):
        big = cv2.resize(dilated.astype(np.uint8), (rw, rh), interpolation=cv2.INTER_NEAREST) > 0
        weights = cv2.resize(weights, (rw, rh), interpolation=cv2.INTER_LINEAR)
    else:
        big = dilated
    big = big | user_region
    weights = np.maximum(weights, big.astype(np.float32))
    full = np.zeros((height, width), bool)
    full[y0:y1, x0:x1] = big
    return Prepared(picture, user, region, work_image, work_mask, full, weights, kernel, radius, notes)



def describe_work(params: dict, image_size: tuple[int, int]) -> str:
    """What a run worked on, in words, from its `params`: the region around the mask (the rest of
    the image is untouched), the model's working size, and the mask as used.  Two paragraphs; the
    tab shows them under "Details", the CLI prints the first when only a region was processed."""
    width, height = image_size
    x0, y0, x1, y1 = params.get("region") or (0, 0, width, height)
    rw, rh = x1 - x0, y1 - y0
    ww, wh = params.get("working_size") or (rw, rh)  # padded to the model's multiple
    if (rw, rh) == (width, height):
        text = f"Worked on the whole {width}x{height} image, at {ww}x{wh} pixels."
    else:
        text = (f"Worked on a {rw}x{rh} region around the mask (x {x0} to {x1}, y {y0} to {y1}), at {ww}x{wh} "
                "pixels; pixels outside it are unchanged.")
    part = "image" if (rw, rh) == (width, height) else "region"
    if ww * wh < rw * rh:
        text += (f" The {part} is larger than the model's working size, so it was scaled down to {ww}x{wh} "
                 "and the result scaled back up.")
    elif ww * wh > 1.3 * rw * rh:
        text += (f" The {part} is smaller than the model's working size, so it was scaled up to {ww}x{wh} "
                 "and the result scaled back down.")
    mask = f"The mask: grown by {params['grow']} px" if params.get("grow") else "The mask: as painted"
    if int(params.get("blur_kernel") or 1) > 1:
        mask += f", softened with a {params['blur_kernel']} px blur"
    if params.get("feather_radius"):
        mask += f"; the result is blended in over {params['feather_radius']} px around it"
    return text + "\n\n" + mask + "."


# ------------------------------------------------------------------------------------ DDIM


#: The model outputs the DDIM schedulers take (the model's `prediction_type`).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddim_scheduler(pipe, steps: int) -> DDIMScheduler:
    """This call's own DDIM scheduler, its timesteps set for `steps`: the model's betas and prediction
    type with `DDIM_CONFIG`.  The cached pipeline's scheduler is only read, never changed."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **DDIM_CONFIG)
    prediction = scheduler.config.prediction_type
    if prediction not in PREDICTION_TYPES:
        raise UserInputError(f"The model's prediction type {prediction!r} is not supported.")
    scheduler.set_timesteps(steps)
    return scheduler


def inverse_scheduler(scheduler: DDIMScheduler) -> DDIMInverseScheduler:
    """DDIM inversion on the same schedule (DIP), for predicted noise (see `predicted_noise`)."""
    known = inspect.signature(DDIMInverseScheduler.__init__).parameters  # no warning for the others
    config = {k: v for k, v in scheduler.config.items() if k in known}
    inverse = DDIMInverseScheduler.from_config(config, prediction_type="epsilon")
    inverse.set_timesteps(scheduler.num_inference_steps)
    return inverse


def executed_timesteps(scheduler: DDIMScheduler, strength: float) -> list[int]:
    """The timesteps that run at this strength: the last int(steps * strength) of the schedule."""
    steps = scheduler.num_inference_steps
    count = min(int(steps * strength), steps)
    return [int(t) for t in scheduler.timesteps.tolist()[steps - count:]]


def predicted_noise(scheduler: DDIMScheduler, output: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
    """The model's output at timestep t on latent z, as predicted noise, converted at t.

    The inversion evaluates the model at t on the latent of the timestep before; the inverse
    scheduler would convert v (or x0) with that earlier timestep's alpha, we use the one the model
    was told.  Noise passes through unchanged.
    """
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return output
    a = scheduler.alphas_cumprod[t]
    if prediction == "v_prediction":
        return a ** 0.5 * output + (1 - a) ** 0.5 * z
    return (z - a ** 0.5 * output) / (1 - a) ** 0.5  # "sample"


def add_noise(scheduler: DDIMScheduler, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """z0 noised to timestep t with `noise` (the same t for every sample)."""
    return scheduler.add_noise(z0, noise, torch.tensor([t]))


def sarg(eps_normal: torch.Tensor, eps_aas: torch.Tensor, scale: float) -> torch.Tensor:
    """Self-attention redirection guidance: eps_normal + s * (eps_aas - eps_normal)."""
    return eps_normal + scale * (eps_aas - eps_normal)


def repaste(z: torch.Tensor, background: torch.Tensor, latent_mask: torch.Tensor) -> torch.Tensor:
    """(1 - m) * background + m * z for a binary latent mask (exact: a selection, no arithmetic)."""
    return torch.where(latent_mask, z, background)


def latent_mask(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel masks (B, H, W) binarised (> 0.5) and max-pooled to the latent grid: (B, 1, h, w) bool."""
    binary = (masks.float() > 0.5).float()[:, None]
    return F.adaptive_max_pool2d(binary, latent_hw) > 0


# -------------------------------------------------------------------------------- the model


class _Conditioning:
    """The fill prompt's embeddings (the paper's: the empty prompt) and SDXL's added conditions,
    repeated for n batch rows."""

    def __init__(self, pipe, bb: EraserBackbone, height: int, width: int, device, dtype, prompt: str = ""):
        with torch.no_grad():
            self.embeds, self.added = bb.backbone.conditioning(pipe, prompt, height, width, device, dtype)
        self._cache: dict[int, tuple] = {}

    def rows(self, n: int) -> tuple[torch.Tensor, dict | None]:
        if n not in self._cache:
            added = None if self.added is None else {k: v.repeat(n, 1) for k, v in self.added.items()}
            self._cache[n] = (self.embeds.repeat(n, 1, 1), added)
        return self._cache[n]


@contextmanager
def _vae_float32(pipe):
    """Run the VAE in float32 when it is float16 and its config asks for it (SDXL's VAE overflows)."""
    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(dtype=torch.float32)
        try:
            yield torch.float32
        finally:
            vae.to(dtype=torch.float16)
    else:
        yield vae.dtype


@contextmanager
def _freeu(unet, enabled: bool, values: dict):
    if not enabled:
        yield
        return
    saved = [(block, {k: getattr(block, k, None) for k in values}) for block in unet.up_blocks]
    unet.enable_freeu(**values)
    try:
        yield
    finally:
        for block, attrs in saved:
            for k, v in attrs.items():
                setattr(block, k, v)


@models.one_call_at_a_time
def run_sarg(
    pipe,
    z0: torch.Tensor,
    noise: torch.Tensor,
    masks: torch.Tensor,
    settings: EraserSettings | None = None,
    *,
    working_size: tuple[int, int] | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    **options,
) -> torch.Tensor:
    """The Attentive Eraser loop on latents: returns the final float32 latents (B, C, h, w).

    z0: scaled clean latents of the B samples; noise: the noise drawn once per sample (SIP);
    masks: (B or 1, H, W) dilated object masks at working pixel size (latent size times the VAE
    factor).  A sample whose mask is empty gets eps = eps_normal exactly.  settings: as for
    `erase` (the loop reads mode, steps, strength, guidance, ss_steps, ss_scale, aas and freeu;
    `options` override fields by name).  `callback` receives {"step", "timestep", "latents",
    "noise"} after every step (tests and progress).
    """
    bb = backbone(pipe)
    s = (settings or EraserSettings.for_model(pipe)).replace(**options).validated()
    mode, steps, strength, guidance = s.mode, s.steps, s.resolved_strength(), s.guidance
    ss_steps, ss_scale, aas = s.ss_steps, s.ss_scale, s.aas
    freeu = s.resolved_freeu(bb.sd2)
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    batch = z0.shape[0]
    latent_hw = tuple(z0.shape[-2:])
    factor = getattr(pipe, "vae_scale_factor", 8)
    height, width = working_size or (latent_hw[0] * factor, latent_hw[1] * factor)
    masks = masks.to(device)
    if masks.shape[0] == 1 and batch > 1:
        masks = masks.expand(batch, -1, -1)
    m_lat = latent_mask(masks, latent_hw)
    edited = m_lat.flatten(1).any(1)  # (B,)
    scheduler = ddim_scheduler(pipe, steps)
    timesteps = executed_timesteps(scheduler, strength)
    cond = _Conditioning(pipe, bb, height, width, device, dtype, s.fill_prompt)
    z0, noise = z0.to(device, torch.float32), noise.to(device, torch.float32)

    use_aas = aas and guidance != 0 and bool(edited.any())
    use_normal = not use_aas or guidance != 1 or not bool(edited.all())
    roles = tuple(r for r, used in ((NORMAL, use_normal), (AAS, use_aas)) if used)

    def unet_out(z: torch.Tensor, t: int, n_roles: int) -> torch.Tensor:
        embeds, added = cond.rows(n_roles * batch)
        z_in = torch.cat([z] * n_roles) if n_roles > 1 else z
        return unet(z_in.to(dtype), t, encoder_hidden_states=embeds, added_cond_kwargs=added,
                    return_dict=False)[0].float()

    def guided(z: torch.Tensor, t: int) -> torch.Tensor:
        out = unet_out(z, t, len(roles))
        if len(roles) == 1:
            return out
        eps_normal, eps_aas = out.chunk(2)
        return torch.where(edited[:, None, None, None], sarg(eps_normal, eps_aas, guidance), eps_normal)

    total = len(timesteps) * (2 if mode == "dip" else 1)
    bar = pipe.progress_bar(total=total) if progress else nullcontext()
    with torch.no_grad(), _freeu(unet, freeu, FREEU_SD2), bar as bar:
        record = None
        if mode == "dip":
            inverse, record, z = inverse_scheduler(scheduler), [], z0
            for t in reversed(timesteps):  # z_{t - ratio} -> z_t, the model evaluated at t
                z = inverse.step(predicted_noise(scheduler, unet_out(z, t, 1), t, z), t, z).prev_sample
                record.append(z)
                if bar is not None:
                    bar.update()
            record.reverse()  # record[i] is the latent at timesteps[i]
            z = record[0]
        else:
            z = add_noise(scheduler, z0, noise, timesteps[0])
        state = ControlState(row_roles=roles, latent_hw=latent_hw)
        controller = AttentiveEraserAAS(masks, ss_steps=ss_steps, ss_scale=ss_scale, state=state)
        context = attach(unet, controller, track_steps=False) if AAS in roles else nullcontext()
        with context:
            for i, t in enumerate(timesteps):
                state.step = i
                if mode == "dip":
                    z = repaste(z, record[i], m_lat)
                z = scheduler.step(guided(z, t), t, z, eta=0.0).prev_sample
                if mode == "sip":
                    last = i + 1 == len(timesteps)
                    z = repaste(z, z0 if last else add_noise(scheduler, z0, noise, timesteps[i + 1]), m_lat)
                if callback is not None:
                    callback({"step": i, "timestep": t, "latents": z, "noise": noise, "controller": controller})
                if bar is not None:
                    bar.update()
        if mode == "dip":
            z = repaste(z, z0, m_lat)
    return z


# ------------------------------------------------------------------------------- the task


@dataclass
class EraserResult:
    images: list[Image.Image]  # one per seed, each the input's size
    seeds: list[int]
    input: Image.Image
    mask: np.ndarray  # bool (H, W): the dilated mask that was used (input size)
    changed: np.ndarray  # bool (H, W): where the output may differ from the input (feathered mask)
    params: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings for the user (empty mask, resized mask, ...)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def seed(self) -> int:
        return self.seeds[0]

    def mask_overlay(self) -> Image.Image:
        return overlay_mask(self.input, self.mask)

    def output_paths(self, output: str | Path) -> list[Path]:
        output = Path(output)
        if len(self.images) == 1:
            return [output]
        return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(len(self.images))]

    def save(self, output: str | Path) -> list[Path]:
        """Write each image as PNG with its parameters (text chunk and JSON sidecar)."""
        written = []
        for path, image, seed in zip(self.output_paths(output), self.images, self.seeds):
            written += save_image(image, path, {**self.params, "seed": seed, "notes": self.notes})
        return written


def preview(pipe, image, mask, grow: int = 0, crop: str = "auto", blur_kernel: int | None = None) -> tuple[Image.Image, Prepared]:
    """The dilated mask the model will use, drawn over the image (no diffusion)."""
    prepared = prepare(backbone(pipe), image, mask, grow=grow, crop=crop, blur_kernel=blur_kernel)
    return overlay_mask(prepared.image, prepared.mask), prepared


@models.one_call_at_a_time
def erase(pipe, image, mask, settings: EraserSettings | None = None, *, seed: int | None = None,
          progress: bool = True, **options) -> EraserResult:
    """Remove the masked object from `image`; returns images of the input's size.

    image: path, PIL image or uint8 array; mask: path, PIL image, array (white/True/alpha =
    remove), resized to the image with a note if its size differs.
    settings: `EraserSettings` (default: the model's, `EraserSettings.for_model`: the paper's, or
    a model folder's measured ones); `options` override its fields by name
    (`erase(pipe, image, mask, steps=20)`); an unknown name is a TypeError.
    seed: None or negative draws one; image i uses seed + i.
    """
    bb = backbone(pipe)
    settings = (settings or EraserSettings.for_model(pipe)).replace(**options).validated()
    check_fits(pipe.tokenizer, settings.fill_prompt, pipe.tokenizer.model_max_length, "fill prompt")
    strength = settings.resolved_strength()
    base_seed = resolve_seed(seed)
    seeds = [base_seed + i for i in range(settings.num_images)]
    freeu = settings.resolved_freeu(bb.sd2)
    prepared = prepare(bb, image, mask, grow=settings.grow, crop=settings.crop, blur_kernel=settings.blur_kernel,
                       working_side=settings.working_side)
    region = prepared.region
    params = {
        "task": "erase",
        "model": pipe.name_or_path or type(pipe).__name__,
        "seeds": seeds,
        "steps": settings.steps,
        "strength": strength,
        "guidance": settings.guidance,
        "ss_steps": settings.ss_steps,
        "ss_scale": settings.ss_scale,
        "mode": settings.mode,
        "grow": settings.grow,
        "crop": settings.crop,
        "region": list(region.box),
        "working_size": list(region.padded),
        "blur_kernel": prepared.kernel,
        "feather_radius": round(prepared.feather_radius, 2),
        "composite": settings.composite,
        "freeu": freeu,
        "aas": settings.aas,
        "fill_prompt": settings.fill_prompt,
    }
    if prepared.empty:
        for note in prepared.notes:
            logger.warning(note)
        return EraserResult([prepared.image.copy() for _ in seeds], seeds, prepared.image, prepared.mask,
                            prepared.mask.copy(), params, prepared.notes)

    device = pipe.unet.device
    pw, ph = region.padded
    pixels = torch.from_numpy(prepared.work_image).permute(2, 0, 1)[None].float().div(127.5).sub(1)
    vae = pipe.vae
    scaling = vae.config.scaling_factor
    from diffusers.utils.torch_utils import randn_tensor

    with torch.no_grad(), _vae_float32(pipe) as vae_dtype:
        dist = vae.encode(pixels.to(device, vae_dtype)).latent_dist
        z0s, noises = [], []
        for s in seeds:  # per-sample generators: the same seed gives the same image in any batch
            generator = torch.Generator().manual_seed(s)
            z0s.append(dist.sample(generator=generator).float() * scaling)
            noises.append(randn_tensor(z0s[-1].shape, generator=generator, device=device, dtype=torch.float32))
    z0, noise = torch.cat(z0s), torch.cat(noises)
    masks = torch.from_numpy(prepared.work_mask)[None]
    warnings: list[str] = []

    def collect(info):
        warnings[:] = info["controller"].warnings

    z = run_sarg(pipe, z0, noise, masks, settings, working_size=(ph, pw), callback=collect, progress=progress)
    with torch.no_grad(), _vae_float32(pipe) as vae_dtype:
        decoded = torch.cat([vae.decode((zi[None] / scaling).to(vae_dtype)).sample for zi in z])
    arrays = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = arrays.permute(0, 2, 3, 1).cpu().numpy()
    images = [_paste_back(prepared, array, settings.composite) for array in arrays]
    notes = list(prepared.notes)
    if warnings:
        notes.append("The mask is so large that the coarsest attention layers could not be redirected "
                     "away from it; traces of the object may remain.")
    x0, y0, x1, y1 = region.box
    changed = np.zeros_like(prepared.mask)
    changed[y0:y1, x0:x1] = prepared.weights > 0 if settings.composite else True
    return EraserResult(images, seeds, prepared.image, prepared.mask, changed, params, notes)


def _paste_back(prepared: Prepared, decoded: np.ndarray, composite: bool) -> Image.Image:
    """The decoded working image, unpadded, scaled back to the region and composited into the input."""
    region = prepared.region
    (w, h), (rw, rh) = region.size, region.region_size
    x0, y0, x1, y1 = region.box
    result = decoded[:h, :w]
    if (w, h) != (rw, rh):
        growing = rw * rh > w * h
        result = cv2.resize(result, (rw, rh), interpolation=cv2.INTER_CUBIC if growing else cv2.INTER_AREA)
    full = np.array(prepared.image)
    original = full[y0:y1, x0:x1]
    if composite:
        m = prepared.weights[..., None]
        blended = (m * result.astype(np.float32) + (1 - m) * original.astype(np.float32)).round()
        result = np.where(m > 0, np.clip(blended, 0, 255).astype(np.uint8), original)
    full[y0:y1, x0:x1] = result
    return Image.fromarray(full)
