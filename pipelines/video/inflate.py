"""Tune-A-Video-style inflation of an SD 1.x/2.x `UNet2DConditionModel` (`builtin` included).

`inflate(unet)` returns a NEW module: a deep copy of `unet` (the registry's cached model is
shared by every task and is never changed; the copy costs one more UNet of memory and is what
the per-video fine-tune trains), with

- a temporal attention block in every `BasicTransformerBlock`: submodules ``norm_temp``
  (LayerNorm) and ``attn_temp`` (a diffusers `Attention`, the block's heads and head width, no
  positional encoding), applied after the feed-forward as ``x <- x + attn_temp(norm_temp(x))``
  over the frames of each token.  Its output projection's weight AND bias are zero (Tune-A-Video
  zeroes only the weight), so at initialisation the inflated UNet equals the frame-wise UNet with
  sparse-causal self-attention;
- frame-joint GroupNorm (the default, Tune-A-Video's): the ResNets' ``norm1``/``norm2`` and
  ``conv_norm_out`` become `FrameJointGroupNorm`, a `GroupNorm` subclass holding the same
  parameters whose statistics run over (frames, h, w) of each clip; ``per_frame_groupnorm=True``
  keeps plain per-frame GroupNorm (cheaper, an approximation).  The transformers' input norm
  stays per frame, as in Tune-A-Video.

Nothing overrides a `forward`.  What needs the frame count is installed per call by
`video_call(unet, controller)`, the video counterpart of `attach`: the controller's processors
(sparse-causal attention on every attn1, through `attach`), a pre-hook that folds the 5-D input
(B, C, F, H, W) into (B * F, C, H, W) rows (text and timesteps repeated per frame) and a hook
that unfolds the output, the temporal-attention hooks, and the per-call state bound into the
GroupNorms.  The frame count is `controller.state.frames`, which `attach`'s own pre-hook reads
from the 5-D input; everything is removed when the call ends.  Backward passes (fine-tune, RAD)
run inside the same `video_call`, so gradient-checkpoint recomputation sees the same hooks.

`video_call` also runs AnimateDiff's motion UNet (pipelines/video/motion.py), whose forward takes
the frames itself: there it only attaches the controller and repeats the text per frame.  Which
path a UNet takes is recorded on it (`frame_record(unet).takes_frames`: `Inflation` False,
`motion.MotionBackbone` True); `sparse_causal_layers` gives each its controller's self layers.
"""

from __future__ import annotations

import copy
import inspect
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D

from attention_processors import attach, attention_layer_names
from attention_processors import layers as vocabulary
from attention_processors.core import AttentionController, ControlState

from .. import backbones

__all__ = ["BACKBONE", "FrameJointGroupNorm", "Inflation", "frame_record", "inflate", "inflation",
           "sparse_causal_layers", "temporal_parameters", "video_call", "TEMPORAL_ATTENTION", "TEMPORAL_NORM"]

#: what a result's params call this backbone (the motion UNet is `motion.BACKBONE`)
BACKBONE = "tune-a-video"

TEMPORAL_NORM, TEMPORAL_ATTENTION = "norm_temp", "attn_temp"
_STOCK_PROCESSORS = (AttnProcessor2_0, AttnProcessor)
_INIT_SEED = 20_240_614  # the temporal attention's initial (q, k, v) weights


class FrameJointGroupNorm(torch.nn.GroupNorm):
    """GroupNorm whose statistics run over the frames of each clip: (B * F, C, H, W) rows are
    normalised as the (B, C, F, H, W) tensor would be by `nn.GroupNorm`.  The frame count comes
    from the per-call state `video_call` binds (`frame_state`); outside a call it refuses to run."""

    frame_state: ControlState | None = None

    @classmethod
    def sharing(cls, norm: torch.nn.GroupNorm) -> "FrameJointGroupNorm":
        """A FrameJointGroupNorm holding `norm`'s own parameter objects."""
        joint = cls(norm.num_groups, norm.num_channels, norm.eps, affine=False)
        joint.affine = norm.affine
        joint.weight, joint.bias = norm.weight, norm.bias
        return joint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frame_state is None:
            raise RuntimeError("an inflated UNet runs only inside pipelines.video.inflate.video_call")
        frames = self.frame_state.frames
        if frames == 1:
            return super().forward(x)
        rows = x.shape[0]
        if rows % frames:
            raise ValueError(f"{rows} rows do not hold whole clips of {frames} frames")
        clips = x.reshape(rows // frames, frames, *x.shape[1:]).transpose(1, 2)  # (B, C, F, H, W)
        out = F.group_norm(clips, self.num_groups, self.weight, self.bias, self.eps)
        return out.transpose(1, 2).reshape(x.shape)


@dataclass(frozen=True)
class Inflation:
    """What `inflate` did to a copy, recorded on it (``unet._video_inflation``)."""

    per_frame_groupnorm: bool
    blocks: tuple[str, ...]  # the BasicTransformerBlocks that got temporal attention
    group_norms: tuple[str, ...]  # the GroupNorms made frame-joint (empty with per_frame_groupnorm)
    lock: object  # one call at a time per inflated UNet (hooks and bindings are per call)

    #: a 2-D UNet: `video_call` folds the frames into the batch and installs the temporal hooks
    takes_frames: ClassVar[bool] = False
    #: the backbone's name in a result's params
    name: ClassVar[str] = BACKBONE


def frame_record(unet):
    """The record of a video UNet: `Inflation` (from `inflate`) or `motion.MotionBackbone` (from
    `motion.motion_unet`); ValueError for any other module.  Both say `takes_frames`."""
    record = getattr(unet, "_video_inflation", None) or getattr(unet, "_video_motion", None)
    if record is None:
        raise ValueError("this UNet is not a video UNet; use pipelines.video.inflate.inflate(unet) or "
                         "pipelines.video.motion.motion_unet(unet, adapter, name)")
    return record


def inflation(unet) -> Inflation:
    """The record of an inflated UNet; ValueError for any other module."""
    record = getattr(unet, "_video_inflation", None)
    if record is None:
        raise ValueError("this UNet is not inflated; use pipelines.video.inflate.inflate(unet)")
    return record


def _frame_joint_norm_names(unet) -> list[str]:
    names = [f"{name}.{norm}" for name, module in unet.named_modules() if isinstance(module, ResnetBlock2D)
             for norm in ("norm1", "norm2") if isinstance(getattr(module, norm, None), torch.nn.GroupNorm)]
    if isinstance(getattr(unet, "conv_norm_out", None), torch.nn.GroupNorm):
        names.append("conv_norm_out")
    return names


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def inflate(unet: UNet2DConditionModel, per_frame_groupnorm: bool = False) -> UNet2DConditionModel:
    """A video copy of an SD 1.x/2.x UNet (see the module docstring); `unet` itself is not changed.

    Call it while nothing else runs the model (a task holds `models.exclusive(pipe)`), so that no
    processor of another task's call is copied.  Every parameter of the copy starts frozen.
    """
    if not backbones.SD.matches(unet):
        raise ValueError("inflation takes an SD 1.x/2.x UNet2DConditionModel")
    if getattr(unet, "_video_inflation", None) is not None:
        raise ValueError("this UNet is inflated already")
    for name, processor in unet.attn_processors.items():
        if not isinstance(processor, _STOCK_PROCESSORS):
            raise ValueError(f"{name} has the processor {type(processor).__name__}; inflate a UNet with its stock "
                             "processors (not while another call has attention control attached)")
    video = copy.deepcopy(unet)
    # what the shared model's instance carries for its own sake does not describe the copy: a
    # forward replaced on the instance (``unet.forward = torch.compile(unet.forward)``, a user's or
    # a benchmark's) is bound to the shared model and would run it instead of the copy, and
    # `models.compile_denoiser`'s record would claim the copy compiled (Edit video compiles the
    # copy itself: pipelines/video/edit.py)
    for attribute in ("forward", "_project_compiled", "_project_compile_options"):
        vars(video).pop(attribute, None)
    video.requires_grad_(False)
    parameter = next(unet.parameters())
    blocks = []
    for name, block in list(video.named_modules()):
        if not isinstance(block, BasicTransformerBlock):
            continue
        dim = block.norm1.normalized_shape[0]
        heads = block.attn1.heads
        # seeded per block (without touching the caller's random state): every inflation of a
        # model is the same, so a cached fine-tune or inversion fits any later inflated copy
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_INIT_SEED + len(blocks))
            norm = torch.nn.LayerNorm(dim)
            temporal = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False,
                                 upcast_attention=block.attn1.upcast_attention)
        torch.nn.init.zeros_(temporal.to_out[0].weight)
        torch.nn.init.zeros_(temporal.to_out[0].bias)
        for module in (norm, temporal):
            module.to(device=parameter.device, dtype=parameter.dtype).requires_grad_(False)
        block.add_module(TEMPORAL_NORM, norm)
        block.add_module(TEMPORAL_ATTENTION, temporal)
        blocks.append(name)
    norms = [] if per_frame_groupnorm else _frame_joint_norm_names(video)
    for name in norms:
        _set_submodule(video, name, FrameJointGroupNorm.sharing(video.get_submodule(name)))
    video._video_inflation = Inflation(bool(per_frame_groupnorm), tuple(blocks), tuple(norms), threading.RLock())
    return video


def temporal_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The parameters of every temporal attention module (``...attn_temp.*``), by name."""
    return {name: p for name, p in unet.named_parameters() if f".{TEMPORAL_ATTENTION}." in name}


def self_attention_layers(unet) -> list[str]:
    """The attn1 layers of the UNet (those sparse-causal attention replaces on an inflated UNet)."""
    return vocabulary.self_attention(attention_layer_names(unet))


def sparse_causal_layers(unet) -> list[str]:
    """The layers a video controller runs with sparse-causal attention: every attn1 of an inflated
    UNet (Tune-A-Video), none of a motion UNet (AnimateDiff keeps per-frame self-attention; see
    pipelines/video/motion.py)."""
    return [] if frame_record(unet).takes_frames else self_attention_layers(unet)


def _temporal_hook(state: ControlState):
    def hook(block, args, output):
        frames = state.frames
        rows, tokens, channels = output.shape
        if rows % frames:
            raise ValueError(f"{rows} rows do not hold whole clips of {frames} frames")
        clips = rows // frames
        x = output.view(clips, frames, tokens, channels).transpose(1, 2).reshape(clips * tokens, frames, channels)
        x = x + block.attn_temp(block.norm_temp(x))
        return x.view(clips, tokens, frames, channels).transpose(1, 2).reshape(rows, tokens, channels)

    return hook


@contextmanager
def video_call(unet, controller: AttentionController) -> Iterator[ControlState]:
    """Within the block, `unet(sample, t, encoder_hidden_states=text)` takes a (B, C, F, H, W)
    sample (text (B, L, D), timesteps () or (B,)) and returns the (B, C, F, H, W) prediction.

    `unet` is a video UNet (`frame_record`).  On an inflated UNet `controller` must control every
    attn1 layer with sparse-causal attention (`sparse_causal_layers`); its `state.frames` is the
    frame count of each call.  A motion UNet takes the frames itself (`_native_frame_call`).  One
    call at a time per video UNet (a lock); everything is removed on exit, also on errors.
    """
    record = frame_record(unet)
    if record.takes_frames:
        with _native_frame_call(unet, controller, record) as state:
            yield state
        return
    state = controller.state
    missing = [name for name in self_attention_layers(unet) if not controller.select(name)]
    if missing:
        raise ValueError(f"the controller leaves {len(missing)} self-attention layers (e.g. {missing[0]}) frame-wise")
    signature = inspect.signature(unet.forward)
    folded = {"clips": 0, "frames": 0}  # the same keys at every call: a compiled fold is not retraced

    def fold(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        sample = bound["sample"]
        if sample.ndim != 5:
            raise ValueError(f"an inflated UNet takes (B, C, F, H, W) samples, not {tuple(sample.shape)}")
        b, c, f, h, w = sample.shape
        if state.frames != f:
            raise RuntimeError("the per-call state holds another frame count than the input")
        folded["clips"], folded["frames"] = b, f
        bound["sample"] = sample.transpose(1, 2).reshape(b * f, c, h, w)
        text = bound.get("encoder_hidden_states")
        if text is not None and text.shape[0] == b:
            bound["encoder_hidden_states"] = text.repeat_interleave(f, 0)
        t = bound.get("timestep")
        if torch.is_tensor(t) and t.ndim == 1 and t.shape[0] == b:
            bound["timestep"] = t.repeat_interleave(f, 0)
        return (), bound

    def unfold(module, args, kwargs, output):
        b, f = folded["clips"], folded["frames"]

        def back(x):
            return x.view(b, f, *x.shape[1:]).transpose(1, 2)

        if isinstance(output, tuple):
            return (back(output[0]),) + tuple(output[1:])
        output.sample = back(output.sample)
        return output

    handles = []
    with record.lock, attach(unet, controller, track_steps=False):
        # after attach: its pre-hook reads the 5-D input (frames, latent grid) before we fold it
        handles.append(unet.register_forward_pre_hook(fold, with_kwargs=True))
        handles.append(unet.register_forward_hook(unfold, with_kwargs=True))
        norms = [unet.get_submodule(name) for name in record.group_norms]
        try:
            for name in record.blocks:
                handles.append(unet.get_submodule(name).register_forward_hook(_temporal_hook(state)))
            for norm in norms:
                norm.frame_state = state
            yield state
        finally:
            for handle in handles:
                handle.remove()
            for norm in norms:
                norm.frame_state = None


@contextmanager
def _native_frame_call(unet, controller: AttentionController, record) -> Iterator[ControlState]:
    """`video_call` on a UNet whose forward takes (B, C, F, H, W) itself (a `UNetMotionModel`):
    no fold and no temporal hooks; the controller is attached (its pre-hook reads the frame count
    from the 5-D input into `state.frames`) unless it selects no layer (a fine-tune's controller
    on a UNet without sparse-causal layers), and the (B, L, D) text is repeated per frame, the
    batch layout the model folds its (B * F) rows in (diffusers' AnimateDiff pipeline does this
    before calling it)."""
    signature = inspect.signature(unet.forward)

    def per_frame_text(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        sample, text = bound["sample"], bound.get("encoder_hidden_states")
        if sample.ndim != 5:
            raise ValueError(f"a video UNet takes (B, C, F, H, W) samples, not {tuple(sample.shape)}")
        clips, frames = sample.shape[0], sample.shape[2]
        if text is not None and text.shape[0] == clips:
            bound["encoder_hidden_states"] = text.repeat_interleave(frames, 0)
        return (), bound

    controlled = any(controller.select(name) for name in attention_layer_names(unet))
    with record.lock, ExitStack() as stack:
        if controlled:
            stack.enter_context(attach(unet, controller, track_steps=False))
        handle = unet.register_forward_pre_hook(per_frame_text, with_kwargs=True)  # after attach's own
        stack.callback(handle.remove)
        yield controller.state
