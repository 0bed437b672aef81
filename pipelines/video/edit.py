"""`edit_video`: the whole ReAtCo edit of a clip, and its result.

1. validate everything first (settings, prompts, the clip, the boxes and their words: one
   sentence each, `UserInputError`);
2. encode the prompts and the frames with the shared pipeline's text encoder and VAE (holding
   `models.exclusive(pipe)`; nothing of it is changed);
3. build the video UNet, a new module: a Tune-A-Video inflation of a copy of the UNet
   (`inflate`), or with `motion_adapter` AnimateDiff's motion UNet (`motion`); fine-tune it on
   the clip with the source prompt, or load the cached fine-tune (`tune`; by default the paper's
   200 steps on the inflated UNet, none on the motion UNet); under `--compile` (the shared
   denoiser compiled) compile the copy the same way (`_compile_like_shared`);
4. DDIM-invert the clip with the fine-tuned copy, or load the cached inversion;
5. sample with RAD and IRJS over temporal windows (`reatco.Sampler`), decode, and return a
   `VideoEditResult` (edited frames, source frames, per-word heatmaps, every setting).  With a
   `preview` callback, a few sampling steps (`reatco.preview_steps`) also decode the model's
   current estimate of the clean clip at `preview_frames` and hand it over (`_Previewer`).

Caches live in `cache_dir` (default `$XDG_CACHE_HOME/attention-editing/video`, i.e.
``~/.cache/attention-editing/video``): ``tune/<key>/`` and ``inversion/<key>.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attention_processors.video import ReAtCoAttention

from .. import backbones, models
from ..errors import UserInputError
from ..io import atomic_path, load_tensors, save_tensors
from ..stopping import Stopped
from ..tokenizers import check_fits
from ..video_settings import MAX_SIDE, MIN_SIDE, VideoSettings
from ..viz import overlay
from . import boxes as box_tools
from . import motion
from .clip import Clip, clip_hash, read_clip, resized, write_clip
from .inflate import frame_record, inflate, sparse_causal_layers, video_call
from .reatco import Sampler, capture_layers, default_views, invert
from .tune import TuneCache, VideoTuner, key_of, load_tuned, model_fingerprint, resolve_precision

SUPPORTED = (backbones.SD,)
INVERSION_FORMAT = "video-inversion/1"
#: frames per VAE encode/decode call (fixed, so that results never depend on the window)
VAE_BATCH = 4
#: frames in a preview (see `preview_frames`)
PREVIEW_FRAMES = 3
logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "attention-editing" / "video"


@dataclass
class VideoEditResult:
    frames: list[np.ndarray]  # the edited clip, RGB uint8 (H, W, 3) at the working size
    source: list[np.ndarray]  # the source frames at the working size
    fps: float
    heatmaps: dict[str, np.ndarray]  # bound word -> (F, H, W) float32 in [0, 1]
    targets: list[box_tools.Target]  # boxes in working pixels
    params: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    audio_from: Path | None = None

    def side_by_side(self) -> list[np.ndarray]:
        """Source | edit, frame by frame."""
        return [np.concatenate([s, e], axis=1) for s, e in zip(self.source, self.frames)]

    def heatmap_frames(self, word: str) -> list[Image.Image]:
        """The word's attention drawn over the edited frames."""
        return [overlay(Image.fromarray(f), h) for f, h in zip(self.frames, self.heatmaps[word])]

    def save(self, output: str | Path, side_by_side: str | Path | None = None, heatmaps: bool = True) -> list[Path]:
        """Write the edited MP4 (the source's frame rate and, when it has some, its audio), the
        side-by-side MP4 (default <output>_side_by_side.mp4), one heatmap MP4 per bound word
        (<output>_attn_<word>.mp4) and a JSON sidecar of every setting; returns the paths."""
        output = Path(output)
        if output.suffix.lower() != ".mp4":
            raise UserInputError(f"The output must be an .mp4 file, not '{output.name}'.")
        written = [write_clip(self.frames, output, self.fps, self.audio_from)]
        pair = Path(side_by_side) if side_by_side is not None else output.with_name(f"{output.stem}_side_by_side.mp4")
        written.append(write_clip(self.side_by_side(), pair, self.fps))
        if heatmaps:
            for i, word in enumerate(self.heatmaps):
                safe = "".join(c if c.isalnum() else "_" for c in word)[:40] or "word"
                path = output.with_name(f"{output.stem}_attn_{i}_{safe}.mp4")
                written.append(write_clip(self.heatmap_frames(word), path, self.fps))
        sidecar = output.with_suffix(".json")
        with atomic_path(sidecar) as temp:
            record = {k: v for k, v in self.params.items() if not k.startswith("_")}
            temp.write_text(json.dumps({**record, "notes": self.notes}, indent=2, default=str))
        written.append(sidecar)
        return written


# ----------------------------------------------------------------------------- preparation


def _working_size(backbone, pipe, clip: Clip, settings: VideoSettings, notes: list[str]) -> tuple[int, int]:
    multiple = backbone.size_multiple(pipe)
    width, height = clip.size
    w = settings.width or (width // multiple) * multiple
    h = settings.height or (height // multiple) * multiple
    for side_name, side in (("width", w), ("height", h)):
        if side % multiple or not MIN_SIDE <= side <= MAX_SIDE:
            raise UserInputError(f"The working {side_name} must be a multiple of {multiple} between {MIN_SIDE} and "
                                 f"{MAX_SIDE} for this model, not {side} (the frames are {width}x{height}).")
    if (w, h) != (width, height):
        notes.append(f"The frames were resized from {width}x{height} to {w}x{h}.")
    return w, h


def _validate_prompts(pipe, backbone, source_prompt: str, prompt: str) -> tuple[object, int]:
    for what, text in (("source prompt", source_prompt), ("prompt", prompt)):
        if not isinstance(text, str) or not text.strip():
            raise UserInputError(f"Please enter the {what}.")
    tokenizer, max_length, _ = backbone.text_layout(pipe).first()
    check_fits(tokenizer, source_prompt, max_length, "source prompt")
    check_fits(tokenizer, prompt, max_length)
    return tokenizer, max_length


@torch.no_grad()
def _encode_frames(pipe, frames: list[np.ndarray], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior, each (1, C, F, h, w) float32."""
    vae = pipe.vae
    means, stds = [], []
    for start in range(0, len(frames), batch):
        pixels = torch.from_numpy(np.stack(frames[start:start + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means).transpose(0, 1)[None], torch.cat(stds).transpose(0, 1)[None]


@torch.no_grad()
def _decode(pipe, latents: torch.Tensor, batch: int) -> list[np.ndarray]:
    vae = pipe.vae
    z = latents[0].transpose(0, 1) / vae.config.scaling_factor  # (F, C, h, w)
    frames = []
    for start in range(0, z.shape[0], batch):
        pixels = vae.decode(z[start:start + batch].to(vae.device, vae.dtype)).sample.float()
        array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        frames.extend(list(array))
    return frames


def preview_frames(n_frames: int) -> list[int]:
    """The frames a preview shows: the first, the middle and the last.

    A preview is a glance at where the edit is going while it runs, at the size of one column
    of the tab (about 450 px wide): three frames side by side stay large enough to see the object
    change inside its box, and the first, middle and last show whether the edit follows the
    box's motion over the whole clip (its keyframes are often the first and last frames) and
    stays consistent in time, which a single frame cannot; more frames would be too small to read
    and would cost more to decode."""
    return sorted({0, (n_frames - 1) // 2, n_frames - 1})


class _Previewer:
    """`Sampler.run`'s preview hook: decodes the x0 prediction at `preview_frames` (holding the
    shared VAE's lock, like the final decode) and hands `preview(step, total, {frame: RGB
    uint8 array})` to the caller.  A callback (or decode) that raises anything but a stop is
    logged and noted, and the edit goes on without previews: the sampling state is untouched by
    it (the decode reads a copy of the estimate, under no_grad)."""

    def __init__(self, pipe, preview: Callable, n_frames: int, notes: list[str]):
        self.pipe, self.preview, self.notes = pipe, preview, notes
        self.frames = preview_frames(n_frames)
        self.failed = False

    def __call__(self, step: int, total: int, x0: torch.Tensor) -> None:
        if self.failed:
            return
        try:
            with models.exclusive(self.pipe):
                decoded = _decode(self.pipe, x0[:, :, self.frames], VAE_BATCH)
            self.preview(step, total, dict(zip(self.frames, decoded)))
        except Stopped:
            raise
        except Exception as error:  # noqa: BLE001 (a preview is never worth the edit)
            self.failed = True
            logger.warning("the preview failed at editing step %d; the edit goes on without it", step, exc_info=True)
            self.notes.append(f"The preview failed at editing step {step} ({type(error).__name__}: "
                              f"{str(error)[:200]}); the edit went on without it.")


def _heatmaps(controller: ReAtCoAttention, targets, columns_of, grid, size) -> dict[str, np.ndarray]:
    if controller.heat is None or not bool((controller.heat_count > 0).all()):
        return {}
    mean = controller.heat / controller.heat_count  # (F, N, C)
    out = {}
    for target in targets:
        cols = columns_of[target.word]
        maps = mean[..., cols].amax(-1).view(-1, 1, *grid)
        up = F.interpolate(maps, size=(size[1], size[0]), mode="bilinear", align_corners=False)[:, 0]
        lo, hi = float(up.min()), float(up.max())
        out[target.word] = ((up - lo) / (hi - lo + 1e-8)).cpu().numpy().astype(np.float32)
    return out


#: Dynamo graphs per transformer block the video copy may add to the shared block code: the
#: image methods' 8 (`models.compile_denoiser`) plus the inversion's pass, RAD's gradient pass
#: and the guided pass (each its own rows, roles or gradients)
VIDEO_GRAPHS_PER_BLOCK = 11


def _compile_like_shared(pipe, unet3d) -> bool:
    """`--compile`: when the shared denoiser was compiled (`models.compile_denoiser`), compile the
    edit's own video UNet with the same options, after the fine-tune (which trains eagerly), before
    the inversion.  Regionally, as the shared UNet: its transformer blocks, the inflated UNet's
    class's `_repeated_blocks`; a motion UNet's class names none, so its spatial and motion
    `BasicTransformerBlock`s.  A new copy per edit costs no new graphs: the blocks share their
    code, and Dynamo's guards are on values (frame count, pass, layer name), not on the copy.
    Returns whether it compiled."""
    options = models.compile_options(models.denoiser(pipe))
    if options is None:
        return False
    if not getattr(unet3d, "_repeated_blocks", None):
        unet3d._repeated_blocks = ["BasicTransformerBlock"]  # on this instance only
    models.compile_regions(unet3d, graphs_per_block=VIDEO_GRAPHS_PER_BLOCK, **options)
    return True


# ----------------------------------------------------------------------------- the task


def edit_video(pipe, video, source_prompt: str, prompt: str, boxes=(), settings: VideoSettings | None = None, *,
               cache_dir: str | Path | None = None, fps: float | None = None,
               progress: Callable | None = None, stop: Callable[[], bool] | None = None,
               preview: Callable | None = None, record_inputs: bool = False, **overrides) -> VideoEditResult:
    """Edit `video` (a file, a folder of frames or a list of frames) from `source_prompt` to
    `prompt`, each box ("WORD:x1,y1,x2,y2[@FRAME]", a `boxes.Box` or (word, (x1, y1, x2, y2)[,
    frame])) holding its word.  `settings` and keyword overrides of its fields; `progress(stage,
    done, total, loss)` is told about every fine-tune, inversion and editing step; `stop()` is
    asked between steps (a stop raises `pipelines.stopping.Stopped`, keeping the cached fine-tune
    checkpoint and a finished inversion).  `preview(step, total, frames)` is told, after at most
    `reatco.PREVIEWS` editing steps (never the last), the model's current estimate of the edited
    clip: `frames` maps each of `preview_frames` to an RGB uint8 (H, W, 3) array at the working
    size; without it nothing is decoded before the result.  `record_inputs` keeps every model
    input of the sampling loop in ``result.params["_sampler"]`` (tests)."""
    started = time.perf_counter()
    settings = (settings or VideoSettings()).replace(**overrides).validated()
    backbone = backbones.require(pipe, SUPPORTED, "Edit video")
    with models.exclusive(pipe):  # the shared tokenizer (see models.exclusive)
        tokenizer, max_length = _validate_prompts(pipe, backbone, source_prompt, prompt)
    device = pipe.device
    resolve_precision(settings.mixed_precision, device)
    adapter_name = settings.motion_adapter
    adapter = motion.load_adapter(adapter_name) if adapter_name is not None else None
    if adapter is not None:
        motion.check_fits(adapter, pipe.unet, adapter_name)
    clip = read_clip(video, max_frames=settings.frames or None, stride=settings.frame_stride, fps=fps)
    n_frames = len(clip.frames)
    if n_frames < 2:
        raise UserInputError("The clip has only one frame; a video edit needs at least 2 frames.")
    notes: list[str] = []
    width, height = _working_size(backbone, pipe, clip, settings, notes)
    with models.exclusive(pipe):
        targets = box_tools.resolve(boxes, prompt, tokenizer, max_length, n_frames, clip.size)
    targets = box_tools.scaled(targets, width / clip.size[0], height / clip.size[1])
    if not targets:
        notes.append("No boxes were given: RAD and IRJS are off, the whole clip follows the prompt.")
    frames = resized(clip.frames, width, height)
    views = default_views(n_frames, settings)
    tune_steps = settings.fine_tune_steps()
    if adapter is not None:  # the motion modules' positional encoding bounds the frames of one call
        motion.check_run_length(adapter, adapter_name, max(b - a for a, b in views), "window")
        if tune_steps:
            motion.check_run_length(adapter, adapter_name, settings.tune_run(n_frames), "fine-tune run")
        if settings.per_frame_groupnorm:
            notes.append("Per-frame GroupNorm changes nothing with a motion adapter: AnimateDiff's GroupNorms are "
                         "per frame already.")
    video_key = clip_hash(frames, clip.fps)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    timings: dict[str, float] = {}

    # ---------------------------------------------------------------- encode (shared components)
    factor = backbone.vae_factor(pipe)
    batch = VAE_BATCH
    with models.exclusive(pipe), torch.no_grad():
        cond = backbone.encode_text(pipe, prompt, device, {}).embeds
        source_text = backbone.encode_text(pipe, source_prompt, device, {}).embeds
        uncond, _ = backbone.unconditional(pipe, height, width, device, pipe.unet.dtype)
        mean, std = _encode_frames(pipe, frames, batch)
        model_key = model_fingerprint(pipe)  # reads weights a Personalize step swaps while it runs
        if adapter is not None:
            unet3d = motion.motion_unet(pipe.unet, adapter, adapter_name)
        else:
            unet3d = inflate(pipe.unet, per_frame_groupnorm=settings.per_frame_groupnorm)
    video_backbone = frame_record(unet3d)
    dtype = pipe.unet.dtype
    scaling = float(pipe.vae.config.scaling_factor)
    generator = torch.Generator().manual_seed(settings.seed)
    x0 = ((mean.cpu() + std.cpu() * torch.randn(mean.shape, generator=generator)) * scaling).to(device, dtype)

    # ---------------------------------------------------------------- fine-tune (cached, resumable)
    # the adapter's identity enters both cache keys (only with an adapter, so that the inflated
    # UNet's keys, and the caches users have, stay as they were)
    adapter_key = {"motion_adapter": video_backbone.fingerprint} if adapter is not None else {}
    tune_fp = {"model": model_key, "clip": video_key, "source_prompt": source_prompt,
               "tune_steps": tune_steps, "tune_lr": settings.tune_lr, "tune_frames": settings.tune_run(n_frames),
               "precision": resolve_precision(settings.mixed_precision, device),
               "per_frame_groupnorm": settings.per_frame_groupnorm, "seed": settings.seed, **adapter_key}
    tune_key = key_of(tune_fp)
    tick = time.perf_counter()
    tune_cached = False
    if tune_steps:
        cache = TuneCache(root / "tune" / tune_key, tune_fp)
        tune_cached = load_tuned(unet3d, cache)
        if not tune_cached:
            if dtype != torch.float32:  # float32 master weights on our copy (see tune.py)
                unet3d.float()
            try:
                VideoTuner(pipe, unet3d, mean, std, source_text, settings, cache, device).run(progress, stop)
            finally:
                if dtype != torch.float32:
                    unet3d.to(dtype)
    timings["fine_tune_s"] = time.perf_counter() - tick
    compiled = _compile_like_shared(pipe, unet3d)

    # ---------------------------------------------------------------- inversion (cached)
    layers, level = capture_layers(unet3d)
    controller = ReAtCoAttention(sparse_causal_layers(unet3d), layers)
    inversion_fp = {"tune": tune_key if tune_steps else model_key, "clip": video_key, "steps": settings.steps,
                    "views": views, "seed": settings.seed, "per_frame_groupnorm": settings.per_frame_groupnorm,
                    **adapter_key}
    inversion_path = root / "inversion" / f"{key_of(inversion_fp)}.safetensors"
    tick = time.perf_counter()
    inversion_cached = inversion_path.is_file()
    with video_call(unet3d, controller):
        if inversion_cached:
            tensors, _ = load_tensors(inversion_path, INVERSION_FORMAT, "cached inversion", "Edit video's inversion")
            z_T = tensors["z_T"].to(device, dtype).clone()  # own, aligned memory (not a view of the file)
        else:
            z_T = invert(unet3d, controller, x0, uncond, pipe.scheduler.config, settings.steps, views, progress, stop)
            save_tensors(inversion_path, {"z_T": z_T},
                         {"format": INVERSION_FORMAT, "fingerprint": json.dumps(inversion_fp, default=str)},
                         "cached inversion")
        timings["inversion_s"] = time.perf_counter() - tick

        # ------------------------------------------------------------ sampling with RAD and IRJS
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(settings.steps, device=device)
        latent_hw = (height // factor, width // factor)
        grid = (math.ceil(latent_hw[0] / 2 ** level), math.ceil(latent_hw[1] / 2 ** level))
        inside = box_tools.grid_masks(targets, factor * 2 ** level, grid) if targets else None
        irjs = box_tools.union_mask(targets, factor, latent_hw) if targets else None
        columns_of, columns = {}, []
        for target in targets:
            columns_of[target.word] = list(range(len(columns), len(columns) + len(target.positions)))
            columns += target.positions
        if settings.heatmaps and targets:
            controller.start_heat(columns, n_frames, grid[0] * grid[1], device)
        sampler = Sampler(unet3d, controller, scheduler, settings, x0, z_T, cond, uncond.expand_as(cond),
                          [t.positions for t in targets], inside, irjs, views,
                          torch.Generator().manual_seed(settings.seed + 1), record_inputs=record_inputs)
        tick = time.perf_counter()
        latents = sampler.run(progress, stop, _Previewer(pipe, preview, n_frames, notes) if preview else None)
        timings["edit_s"] = time.perf_counter() - tick

    with models.exclusive(pipe):
        edited = _decode(pipe, latents, batch)
    heat = _heatmaps(controller, targets, columns_of, grid, (width, height))
    timings["total_s"] = time.perf_counter() - started
    params = {
        "task": "edit-video", "method": "ReAtCo", "model": str(getattr(pipe, "name_or_path", "") or ""),
        "backbone": backbone.name, "source_prompt": source_prompt, "prompt": prompt,
        "settings": dataclasses.asdict(settings), "frames": n_frames, "fps": clip.fps, "size": [width, height],
        "boxes": [{"word": t.word, "tokens": t.positions, "keyframes": t.keyframes,
                   "boxes": t.boxes.round(2).tolist()} for t in targets],
        "video_backbone": video_backbone.name, "motion_adapter": adapter_name,
        "motion_adapter_fingerprint": video_backbone.fingerprint if adapter is not None else None,
        "fine_tune_steps": tune_steps, "fine_tune_ran": bool(tune_steps) and not tune_cached,
        "capture_layers": sorted(layers), "views": views, "fine_tune_cached": tune_cached,
        "inversion_cached": inversion_cached, "compiled": compiled, "gradient_passes": sampler.gradient_passes,
        "rad_losses": sampler.losses, "timings": timings,
    }
    if record_inputs:
        params["_sampler"] = sampler
    audio = clip.path if clip.path is not None and settings.frame_stride == 1 else None
    if clip.path is not None and settings.frame_stride != 1:
        notes.append("The frame stride changes the timing, so the audio was left out.")
    return VideoEditResult(edited, frames, clip.fps, heat, targets, params, notes, audio)
