"""AnimateDiff, Edit video's second backbone (beyond the paper): the shared SD 1.x/2.x UNet with a
diffusers `MotionAdapter`'s motion modules, as diffusers' `UNetMotionModel.from_unet2d` builds it.

    adapter = load_adapter("path/to/motion-adapter")   # a folder (config.json + safetensors) or a hub id
    check_fits(adapter, pipe.unet, name)               # one sentence if its blocks do not fit
    video = motion_unet(pipe.unet, adapter, name)      # a NEW module; pipe.unet is not changed

What differs from the Tune-A-Video inflation (`inflate`), and why:

- **No per-video fine-tune by default.**  AnimateDiff's motion modules were trained on videos,
  so the motion UNet is usable as it is (`VideoSettings.fine_tune_steps`: 0 with an adapter, the
  paper's 200 on the inflated UNet, whose temporal attention starts at zero).  A fine-tune asked
  for (`tune_steps`) trains the spatial q projections (``attentions.*.attn1/attn2.to_q``, as
  Tune-A-Video does) and every attention of the motion modules (``motion_modules.*.attn1/attn2``,
  the counterpart of Tune-A-Video's ``attn_temp``), on the copy, never on the adapter or the
  shared UNet (`trainable_parameters`).
- **Frames natively.**  `UNetMotionModel.forward` takes (B, C, F, H, W) samples; it folds the
  frames into the batch itself (B * F rows, each clip's frames contiguous, the same row layout as
  the inflated UNet's fold) and runs its motion modules over the frames.  So `video_call` installs
  no fold/unfold and no temporal hooks on it: only `attach` (whose pre-hook reads the frame count
  from the 5-D input into ``controller.state.frames``) and one pre-hook repeating the (B, L, D)
  text per frame, which diffusers' AnimateDiff pipeline does before calling the UNet.  The
  difference is recorded on the module (`MotionBackbone.takes_frames`), not tested by type.
- **Per-frame spatial self-attention.**  AnimateDiff was trained with the SD UNet's frame-wise
  self-attention (time lives in the motion modules), so ReAtCo's controller gets no sparse-causal
  layers here (`inflate.sparse_causal_layers` is empty); sparse-causal attention would feed the
  motion modules features they never saw in training, and is not offered.  Likewise the ResNets'
  GroupNorm stays per frame (`per_frame_groupnorm` has no effect).
- **RAD reads the same layers.**  The motion modules' attention layers
  (``...motion_modules.N.transformer_blocks.M.attn1/attn2``, both temporal self-attention) are not
  parsed by the layer vocabulary (attention_processors/layers.py), so no named set, RAD's
  `capture_layers` included, ever selects them.

Adapters are cached (at most `CACHE_SIZE`, by resolved folder and the modification times of its
files, or by hub id) behind one lock; loading reads safetensors only.  `from_unet2d` copies
every weight (`load_state_dict`), so the motion UNet shares no tensor with the shared UNet or
the cached adapter; its random initialisation (overwritten by those copies) runs in a forked RNG,
so building it does not move the caller's random state.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from attention_processors import attention_layer_names
from attention_processors import layers as vocabulary

from .. import backbones, models
from ..errors import UserInputError, out_of_memory_message

__all__ = ["BACKBONE", "MotionBackbone", "adapter_fingerprint", "check_fits", "check_run_length", "load_adapter",
           "motion_record", "motion_unet", "trainable_parameters"]

#: what a result's params call this backbone (the inflated UNet is `inflate.BACKBONE`)
BACKBONE = "animatediff"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
MOTION_MODULES = "motion_modules"
#: adapters kept loaded: a real AnimateDiff adapter is about 1 GB in float32
CACHE_SIZE = 2

_adapters: dict[tuple, object] = {}
_adapters_lock = threading.Lock()


@dataclass(frozen=True)
class MotionBackbone:
    """What `motion_unet` built, recorded on it (``unet._video_motion``)."""

    adapter: str  # the adapter as it was named (a folder or a hub id)
    fingerprint: str  # `adapter_fingerprint`: enters the fine-tune and inversion cache keys
    max_frames: int  # the adapter's motion_max_seq_length: the most frames one call may hold
    lock: object  # one call at a time per motion UNet (hooks and processors are per call)

    #: `UNetMotionModel.forward` takes (B, C, F, H, W) itself: no fold, no temporal hooks
    takes_frames: ClassVar[bool] = True
    #: the backbone's name in a result's params
    name: ClassVar[str] = BACKBONE


def motion_record(unet) -> MotionBackbone | None:
    """The record of a UNet built by `motion_unet`, or None for any other module."""
    return getattr(unet, "_video_motion", None)


# ----------------------------------------------------------------------------- loading adapters


def _local_folder(name: str) -> Path | None:
    """The adapter's folder, or None for a hub id; one sentence for a path that does not exist."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if models.is_hub_id(name):  # "owner/name" that is not an existing path
        return None
    raise UserInputError(f"There is no motion adapter folder at '{name}'.")


def _folder_key(path: Path, name: str) -> tuple:
    """The cache key of an adapter folder (its resolved path and its files' versions), after
    checking that it holds a diffusers MotionAdapter in safetensors."""
    config_path, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not path.is_dir() or not config_path.is_file():
        raise UserInputError(f"'{name}' holds no motion adapter: a diffusers MotionAdapter folder has a {ADAPTER_CONFIG} "
                             f"and a {ADAPTER_WEIGHTS}.")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict) or config.get("_class_name") != "MotionAdapter":
        raise UserInputError(f"'{name}' holds no motion adapter: its {ADAPTER_CONFIG} is not a diffusers MotionAdapter's.")
    if not weights.is_file():
        raise UserInputError(f"'{name}' holds no motion adapter weights in safetensors ({ADAPTER_WEIGHTS}).")
    versions = tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in (config_path, weights))
    return ("folder", str(path.resolve()), versions)


def load_adapter(name: str):
    """The diffusers `MotionAdapter` named by `name` (a local folder, or a hub id read through the
    Hugging Face cache), on the CPU in float32 with its parameters frozen; cached.  Safetensors
    only.  One sentence (`UserInputError`) for a folder that does not exist or holds no adapter."""
    from diffusers import MotionAdapter

    folder = _local_folder(name)
    key = _folder_key(folder, name) if folder is not None else ("hub", name)
    source = key[1]
    with _adapters_lock:
        adapter = _adapters.get(key)
        if adapter is None:
            try:
                adapter = MotionAdapter.from_pretrained(source, use_safetensors=True)
            except Exception as error:  # noqa: BLE001 (a broken or missing adapter is one sentence)
                if out_of_memory_message(error):
                    raise
                where = "the folder" if folder is not None else "the Hugging Face hub (or it cannot be reached)"
                raise UserInputError(f"The motion adapter '{name}' cannot be loaded from {where}: "
                                     f"{' '.join(str(error).split())[:200]}") from error
            adapter.requires_grad_(False).eval()
            while len(_adapters) >= CACHE_SIZE:
                _adapters.pop(next(iter(_adapters)))
            _adapters[key] = adapter
    return adapter


def adapter_fingerprint(adapter) -> str:
    """A short hash of the adapter: its config and a few of its weights (like `tune.model_fingerprint`)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dict(adapter.config), sort_keys=True, default=str).encode())
    params = list(adapter.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _per_block(value, blocks: int) -> list[int]:
    return [int(value)] * blocks if isinstance(value, int) else [int(v) for v in value]


def check_fits(adapter, unet, name: str) -> None:
    """One sentence (`UserInputError`) when the adapter's motion modules do not fit the UNet's
    blocks: block widths, layers per block, GroupNorm groups, or a PIA (image-input) adapter."""
    ours, theirs = unet.config, adapter.config
    if theirs.get("conv_in_channels"):
        raise UserInputError(f"The motion adapter '{name}' takes {theirs['conv_in_channels']} input channels (an "
                             "image-conditioned PIA adapter); Edit video takes a plain AnimateDiff adapter.")
    blocks, adapter_blocks = list(ours.block_out_channels), list(theirs.block_out_channels)
    layers = _per_block(ours.layers_per_block, len(blocks))
    adapter_layers = _per_block(theirs.motion_layers_per_block, len(adapter_blocks))
    if blocks != adapter_blocks or layers != adapter_layers:
        raise UserInputError(f"The motion adapter '{name}' does not fit this model's UNet: its blocks have "
                             f"{adapter_blocks} channels and {adapter_layers} layers, the UNet's {blocks} and {layers}.")
    if theirs.motion_norm_num_groups != ours.norm_num_groups:
        raise UserInputError(f"The motion adapter '{name}' does not fit this model's UNet: its GroupNorms have "
                             f"{theirs.motion_norm_num_groups} groups, the UNet's {ours.norm_num_groups}.")


def check_run_length(adapter, name: str, frames: int, what: str) -> None:
    """One sentence when `frames` frames in one call (`what`: "window" or "fine-tune run") exceed
    the adapter's positional encoding (`motion_max_seq_length`)."""
    longest = int(adapter.config.motion_max_seq_length)
    if frames > longest:
        raise UserInputError(f"The {what} of {frames} frames is longer than the {longest} frames the motion adapter "
                             f"'{name}' encodes (its motion_max_seq_length); use at most {longest}.")


# ----------------------------------------------------------------------------- the motion UNet


def _spatial_attention_layers(unet) -> list[str]:
    """The SD UNet's own attention layers (``attentions.*`` attn1/attn2), never the motion modules'."""
    return vocabulary.select(attention_layer_names(unet), kind=(vocabulary.SELF, vocabulary.CROSS))


def motion_unet(unet, adapter, name: str):
    """A NEW `UNetMotionModel`: the SD 1.x/2.x `unet`'s weights and the adapter's motion modules,
    copied (see the module docstring); on the UNet's device and dtype, every parameter frozen.
    Neither `unet` nor `adapter` is changed (the adapter is moved to the UNet's device for the copy
    and back to the CPU, under the cache's lock).  Call it while nothing else runs the model."""
    from diffusers import UNetMotionModel

    if not backbones.SD.matches(unet):
        raise ValueError("a motion UNet is built from an SD 1.x/2.x UNet2DConditionModel")
    check_fits(adapter, unet, name)
    with _adapters_lock:
        try:
            # from_config initialises every weight at random before the copies overwrite them:
            # in a forked RNG, so that building the model does not move the caller's random state
            with torch.random.fork_rng(devices=[]):
                video = UNetMotionModel.from_unet2d(unet, adapter)
        finally:
            adapter.to("cpu")  # from_unet2d moved the cached adapter to the UNet's device
    video.to(device=unet.device)  # from_unet2d builds on the CPU, in the UNet's dtype
    video.requires_grad_(False)
    video.train(unet.training)
    # UNetMotionModel's config has no upcast_attention (SD 2.x sets it): keep each layer's own flag
    for layer in _spatial_attention_layers(video):
        video.get_submodule(layer).upcast_attention = unet.get_submodule(layer).upcast_attention
    video._video_motion = MotionBackbone(name, adapter_fingerprint(adapter),
                                         int(adapter.config.motion_max_seq_length), threading.RLock())
    return video


def trainable_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} a fine-tune of a motion UNet trains: the spatial attention layers' q
    projections (attn1.to_q, attn2.to_q, as Tune-A-Video) and every parameter of the motion
    modules' attention layers (AnimateDiff's temporal attention: to_q, to_k, to_v, to_out)."""
    spatial = set(_spatial_attention_layers(unet))
    out = {}
    for name, module in unet.named_modules():
        if name in spatial:
            chosen = [(f"to_q.{pname}", p) for pname, p in module.to_q.named_parameters()]
        elif f".{MOTION_MODULES}." in name and name.endswith((".attn1", ".attn2")):
            chosen = list(module.named_parameters())
        else:
            continue
        for pname, p in chosen:
            out[f"{name}.{pname}"] = p
    return out
