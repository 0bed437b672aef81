"""The one mechanism every method in this project is built on.

A method is an `AttentionController`: it says which attention layers it wants (a predicate on the
diffusers layer name) and, on those layers only, what to do with one attention call:

- ``softmax_scale``  change the logit scale (a temperature; SDPA's ``scale``);
- ``attend``   compute the attention output itself (e.g. two temperatures blended per query);
- ``bias``     add a float bias to the logits (passed to SDPA as ``attn_mask``; e.g. -inf-like on
               masked keys, or ``log g`` to rescale probabilities by ``g`` and renormalise);
- ``rescale``  edit explicit probabilities (only when ``needs_probabilities`` says so: this is the
               one path that materialises the N_q x N_k matrix, so methods use it sparingly);
- ``capture``  read what it needs from the call (`AttentionCall.text_probs` computes only the
               image-query x text-key slice, in float32, for the rows asked for);
- ``post``     transform the image-token output the block is about to add to its residual.

`attach(denoiser, controller)` installs the processors of `attention_processors.processors` on
the selected layers for the duration of one call and restores the previous processor objects on
exit, also when the call raises.  Unselected layers keep their stock fused-SDPA processor and
pay nothing.  A forward pre-hook on the denoiser keeps the per-call `ControlState` current: the
step index advances once per denoising step (derived from the timestep, never by counting layer
calls), the latent grid is read from the model input so masks and maps can be resized to any
layer's token grid for any aspect ratio, and FLUX's text length is read from the text sequence.

Attention backends.  The fused attention of controlled layers (`AttentionCall.sdpa`, used by
`controlled_attention` and by policies that run several attentions) goes through diffusers'
dispatcher (`dispatch_attention_fn`, (B, N, heads, D) layout), so the backend a user picks with
``model.set_attention_backend(name)`` or the ``attention_backend(name)`` context manager is the
one our layers use too.  A controlled processor carries the stock processor's
``_attention_backend`` (None: the registry's active backend, i.e. the context manager or
``DIFFUSERS_ATTN_BACKEND``).  Our calls often carry an additive float mask (a controller's bias,
the model's own mask); backends that take no arbitrary float mask (flash, flash-3, sage, ...,
everything outside `FLOAT_MASK_BACKENDS`) would reject or (varlen) misread it, so such a call
falls back to the ``native`` backend (PyTorch SDPA, which picks the best kernel that takes a
mask), logged once per backend; calls without a mask keep the chosen backend.  The explicit-
probability path (`needs_probabilities`) is a float32 matmul and never dispatches.

torch.compile.  Everything a processor reads per step is compile-stable: the step index is a
0-d int64 tensor (`ControlState.step_tensor`, advanced in place from the timestep with no device
read), the latent grid, frames and n_txt are Python values that do not change between steps, and
the pre-hook runs outside any compiled region (`torch.compiler.disable`; hooks of a compiled
module run outside its compiled frame anyway).  Before every forward the hook calls
`AttentionController.begin_forward`, where a policy prepares per-forward buffers eagerly (so the
compiled layers find the same Python structure at every step and never recompile).
`attach` accepts a ``torch.compile``d module (it installs on ``_orig_mod``).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn

from .grids import token_grid

logger = logging.getLogger(__name__)

#: Dispatcher backends that take an arbitrary additive float mask of shape (B | 1, heads | 1, N_q, N_k).
FLOAT_MASK_BACKENDS = frozenset({"native", "_native_math", "_native_efficient", "_native_cudnn"})
#: The backend a masked call falls back to when the chosen one takes no float mask.
MASK_FALLBACK_BACKEND = "native"
_warned_fallback: set[str] = set()


def attention_backend_for(backend, attn_mask: torch.Tensor | None):
    """The dispatcher backend to run one fused attention with: `backend` (a processor's
    ``_attention_backend``; None: the registry's active backend), or the native fallback when the
    call has a mask that backend cannot take (see the module docstring)."""
    name = _AttentionBackendRegistry._active_backend if backend is None else backend
    if attn_mask is None:
        return name
    value = name.value if isinstance(name, AttentionBackendName) else str(name)
    if value in FLOAT_MASK_BACKENDS:
        return name
    if not torch.compiler.is_compiling() and value not in _warned_fallback:
        _warned_fallback.add(value)
        logger.warning("attention backend %r takes no float attention mask: the masked attention calls "
                       "of controlled layers use the %r backend", value, MASK_FALLBACK_BACKEND)
    return AttentionBackendName(MASK_FALLBACK_BACKEND)


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    scale: float | None = None, backend=None) -> torch.Tensor:
    """Attention output (B, heads, N_q, D) of SDPA-layout inputs, through diffusers' dispatcher
    (which takes (B, N, heads, D)) with `attention_backend_for(backend, attn_mask)`."""
    out = dispatch_attention_fn(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask, scale=scale,
        backend=attention_backend_for(backend, attn_mask),
    )
    return out.transpose(1, 2)


def masked_value(dtype: torch.dtype) -> float:
    """The logit bias of a masked key: the dtype's minimum rather than -inf, so that a row with
    every key masked degrades to a uniform softmax instead of NaN (SDPA takes float masks in the
    query dtype)."""
    return torch.finfo(dtype).min


class ControlState:
    """Per-call state shared by the controller and every processor it installed.

    row_roles: what each equal chunk of the batch is, in order, e.g. ``("uncond", "cond")`` for
        a classifier-free-guidance batch of SD/SDXL/SD3/PixArt.  The pipeline declares it; the
        processors never infer halves.
    latent_hw: spatial size of the denoiser's input grid (latent H and W; for FLUX the packed
        token grid).  Set by the pre-hook on every forward.
    n_txt: number of text tokens in FLUX's single-stream (concatenated) sequences.
    frames: number of video frames per batch row (1 for images).  A video denoiser takes 5-D
        latents (B, C, F, H, W); its spatial layers see the frames folded into the batch
        (B * F rows, each role's rows contiguous), its temporal layers see the frames as the
        sequence.  Set by the pre-hook from the input's shape.
    step: denoising step index; -1 before the first step (a Python int: reading it is one
        device read).  `step_tensor` is the same index as a 0-d int64 tensor on the timestep's
        device: what code inside a (compiled) layer call reads.

    Timesteps and FLUX position ids live on the GPU; reading them forces a device sync, which
    stalls a launch-bound pipeline.  So the pre-hook advances the step tensor in place (compare
    with the last timestep, add), with no device read; `step` reads it only when asked.  FLUX's
    packed grid is read from the position ids once per distinct ids tensor (the pipeline passes
    the same one at every step), in the pre-hook, outside any compiled region.
    """

    def __init__(self, row_roles: tuple[str, ...] = ("cond",), latent_hw: tuple[int, int] | None = None,
                 n_txt: int | None = None, frames: int = 1):
        self.row_roles = tuple(row_roles)
        self.frames = int(frames)
        self._latent_hw = latent_hw
        self._position_ids: torch.Tensor | None = None
        self._ids_seen: torch.Tensor | None = None
        self.n_txt = n_txt
        #: batch size and device of the denoiser's last input (set by the pre-hook)
        self.batch_size: int | None = None
        self.device: torch.device | None = None
        self._step_t = torch.full((), -1, dtype=torch.long)
        self._last_t = torch.full((), float("nan"), dtype=torch.float32)
        # the index as a Python int while it is known without a device read: set by a loop owner,
        # or read once after the pre-hook advanced the tensor; None after the hook advanced it
        self._step_known: int | None = -1

    def __repr__(self) -> str:
        return (f"ControlState(row_roles={self.row_roles}, latent_hw={self._latent_hw}, n_txt={self.n_txt}, "
                f"frames={self.frames}, step={self.step})")

    @property
    def step_tensor(self) -> torch.Tensor:
        """The step index as a 0-d int64 tensor (compile-stable: same object, value changes)."""
        return self._step_t

    @property
    def step(self) -> int:
        """The step index as a Python int: at most one device read per step (the first read after
        the pre-hook advanced the tensor), none when a loop owner set it."""
        if self._step_known is None:
            self._step_known = int(self._step_t)
        return self._step_known

    @step.setter
    def step(self, index: int | torch.Tensor) -> None:
        """For loop owners (attach(track_steps=False)): set the step index directly (no device read)."""
        self._step_t.copy_(torch.as_tensor(index, dtype=torch.long))
        self._step_known = None if torch.is_tensor(index) else int(index)

    @property
    def latent_hw(self) -> tuple[int, int] | None:
        if self._position_ids is not None:  # FLUX: the grid is in the image position ids
            ids = self._position_ids
            self._position_ids = None
            self._latent_hw = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        return self._latent_hw

    @latent_hw.setter
    def latent_hw(self, hw: tuple[int, int]) -> None:
        self._position_ids = None
        self._latent_hw = tuple(hw)

    def set_position_ids(self, img_ids: torch.Tensor) -> None:
        """FLUX's (N, 3) image position ids; the packed token grid is read from them when needed
        (once per distinct ids tensor)."""
        if img_ids is self._ids_seen:
            return
        self._ids_seen = img_ids
        self._position_ids = img_ids[0] if img_ids.ndim == 3 else img_ids

    def begin_step(self, timestep: float | torch.Tensor) -> None:
        """Advance the step index if this timestep differs from the last one seen.

        Several forwards within one step (separate CFG passes, extra guidance forwards,
        gradient-checkpoint recomputation) share a timestep and therefore a step index.
        Tensor arithmetic only: no device read, nothing the compiler guards on.
        """
        with torch.no_grad():
            t = torch.as_tensor(timestep).detach().flatten()[:1].float().reshape(())
            if self._step_t.device != t.device:
                self._step_t = self._step_t.to(t.device)
                self._last_t = self._last_t.to(t.device)
            self._step_t.add_((t != self._last_t).long())  # NaN (no step yet) differs from any value
            self._last_t.copy_(t)
        self._step_known = None

    def rows(self, role: str, batch_size: int) -> slice:
        """Batch rows holding `role` (e.g. "cond") in a batch of `batch_size`."""
        if role not in self.row_roles:
            raise KeyError(f"row role {role!r} is not in this call's roles {self.row_roles}")
        n = len(self.row_roles)
        if batch_size % n:
            raise ValueError(f"batch of {batch_size} cannot hold the {n} row roles {self.row_roles}")
        per_role = batch_size // n
        i = self.row_roles.index(role)
        return slice(i * per_role, (i + 1) * per_role)

    def grid(self, n_tokens: int) -> tuple[int, int]:
        """Token grid (h, w) of a layer with `n_tokens` image tokens."""
        if self.latent_hw is None:
            raise RuntimeError("latent size unknown: attach() must wrap the denoiser's forward")
        return token_grid(n_tokens, self.latent_hw)


@dataclass
class AttentionCall:
    """One attention computation in a selected layer, as the processor prepared it.

    query/key/value are in SDPA layout (B, heads, N, head_dim), after every norm and rotary
    embedding the stock processor applies.  For joint attention they hold the concatenated
    sequence in the model's own order; `image_queries` and `text_keys` say where the image-token
    queries and the text-token keys are (text_keys is None for self-attention).

    `segments` names every run of key positions: "text" and "image" by default (the image keys
    of self- and joint attention sit where the image queries are; cross-attention has text keys
    only), derived when asked, so a layer call pays nothing for it.  A backbone whose sequence
    holds more (OmniGen: text, input image, output image; FLUX Kontext: text, noisy latents,
    reference latents) passes its own as `key_segments`, and a method asks `keys("input_image")`
    instead of counting positions.
    """

    name: str
    kind: str  # "self" | "cross" | "joint" | "single"
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    image_queries: slice
    text_keys: slice | None
    state: ControlState
    attn_mask: torch.Tensor | None = None  # the model's own mask plus the controller's bias
    logit_scale: float | None = None  # None: SDPA's default 1/sqrt(head_dim)
    probs: torch.Tensor | None = None  # explicit probabilities, only on the needs_probabilities path
    key_segments: dict[str, slice] | None = None  # a backbone's own names; None: text and image
    backend: object = None  # the processor's dispatcher backend (None: the registry's active one)
    _grid: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def segments(self) -> dict[str, slice]:
        """Every named run of key positions (see the class docstring)."""
        if self.key_segments is not None:
            return self.key_segments
        derived = {} if self.text_keys is None else {"text": self.text_keys}
        if self.kind != "cross":
            derived["image"] = self.image_queries
        return derived

    def keys(self, segment: str) -> slice:
        """Key positions of the named segment ("text", "image", or a backbone's own names)."""
        segments = self.segments
        if segment not in segments:
            raise KeyError(f"{self.name} has no {segment!r} keys; it has {', '.join(segments) or 'none'}")
        return segments[segment]

    @property
    def batch_size(self) -> int:
        return self.query.shape[0]

    @property
    def n_image(self) -> int:
        s = self.image_queries
        return s.stop - s.start

    @property
    def grid(self) -> tuple[int, int]:
        """Image token grid (h, w) of this layer, from the latent size: any aspect ratio."""
        if self._grid is None:
            self._grid = self.state.grid(self.n_image)
        return self._grid

    @property
    def scale(self) -> float:
        return self.logit_scale if self.logit_scale is not None else self.query.shape[-1] ** -0.5

    def rows(self, role: str) -> slice:
        return self.state.rows(role, self.batch_size)

    def sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """Fused attention (B, heads, N_q, D) of SDPA-layout tensors with this layer's backend
        (`fused_attention`): what a policy calls instead of F.scaled_dot_product_attention."""
        return fused_attention(query, key, value, attn_mask=attn_mask, scale=scale, backend=self.backend)

    def _mask_slice(self, rows: slice, queries: slice, keys: slice) -> torch.Tensor | None:
        if self.attn_mask is None:
            return None
        m = self.attn_mask
        # the mask broadcasts over (B, heads, N_q, N_k): slice only the dimensions it really has
        b = rows if m.shape[0] != 1 else slice(None)
        q = queries if m.shape[-2] != 1 else slice(None)
        return m[b, :, q, keys].float()

    def text_logits(self, rows: slice = slice(None), keys: slice | None = None) -> torch.Tensor:
        """float32 logits (b, heads, N_img, n_keys) of image queries on text keys, mask included.

        `keys` selects a part of the text, relative to the start of the text (e.g. SD3's 77
        CLIP tokens); by default all text keys.
        """
        if self.text_keys is None:
            raise RuntimeError(f"{self.name} is self-attention: it has no text keys")
        key_slice = _sub_slice(self.text_keys, keys)
        q = self.query[rows, :, self.image_queries].float()
        # scale the (few) keys rather than the (N_img x N_txt) logits: same result, less traffic
        k = self.key[rows, :, key_slice].float() * self.scale
        logits = q @ k.transpose(-1, -2)
        mask = self._mask_slice(rows, self.image_queries, key_slice)
        return logits if mask is None else logits + mask

    def text_probs(
        self,
        rows: slice = slice(None),
        keys: slice | None = None,
        norm: str = "text_softmax",
        chunk: int = 1024,
    ) -> torch.Tensor:
        """float32 attention probabilities (b, heads, N_img, n_keys) of image queries on text keys.

        norm="text_softmax": softmax over the selected text keys only.  For UNet/PixArt
            cross-attention, whose keys are all text, this is the true attention probability.
        norm="full_row": the true probabilities of a joint layer, exp(logit - LSE over all keys,
            image keys included).  The normaliser is computed in query chunks of `chunk`
            rows: the image x image logits exist one chunk at a time and are never stored.
        """
        if self.probs is not None:  # the explicit path already holds the true probabilities
            key_slice = _sub_slice(self.text_keys, keys)
            p = self.probs[rows, :, self.image_queries, key_slice].float()
            every_key = key_slice.stop - key_slice.start == self.key.shape[2]
            if norm == "full_row" or every_key:
                return p
            return p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        logits = self.text_logits(rows, keys)
        if norm == "text_softmax":
            return logits.softmax(-1)
        if norm != "full_row":
            raise ValueError(f"unknown norm {norm!r}: use 'text_softmax' or 'full_row'")
        q_all = self.query[rows, :, self.image_queries].float()
        k_all = self.key[rows].float()
        lse = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
        start = self.image_queries.start
        for c in range(0, q_all.shape[2], chunk):
            block = (q_all[:, :, c : c + chunk] @ k_all.transpose(-1, -2)) * self.scale
            mask = self._mask_slice(rows, slice(start + c, start + c + block.shape[2]), slice(None))
            if mask is not None:
                block = block + mask
            lse[:, :, c : c + chunk] = block.logsumexp(-1)
        return (logits - lse.unsqueeze(-1)).exp()


def _sub_slice(outer: slice, inner: slice | None) -> slice:
    if inner is None:
        return outer
    start = outer.start + (inner.start or 0)
    stop = outer.stop if inner.stop is None else outer.start + inner.stop
    if stop > outer.stop or start > stop:
        raise ValueError(f"text key range {inner} lies outside the {outer.stop - outer.start} text keys")
    return slice(start, stop)


class AttentionController:
    """Base class of every method: override what the method needs, leave the rest.

    All hooks run only on layers for which `select` returned True, inside the processor, once per
    attention call.  `state` is bound into the processors when they are installed, so hooks can
    read the step index, the batch roles and the latent grid.
    """

    def __init__(self, state: ControlState | None = None):
        self.state = state or ControlState()

    def select(self, name: str) -> bool:
        """Whether to control the layer called `name` (e.g. 'up_blocks.1.attentions.0.transformer_blocks.0.attn2')."""
        return False

    def bias(self, call: AttentionCall) -> torch.Tensor | None:
        """Additive float bias broadcastable to (B, heads, N_q, N_k), or None."""
        return None

    def softmax_scale(self, call: AttentionCall) -> float | None:
        """Logit scale (a softmax temperature); None keeps the model's 1/sqrt(head_dim)."""
        return None

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        """Compute the attention output (B, heads, N_q, head_dim) yourself, or None (the default).

        For policies that need more than one attention per call (e.g. a second softmax
        temperature blended per query); `call.attn_mask` and `call.logit_scale` already hold
        the bias and scale.  Use SDPA inside, not explicit N x N matrices, where possible.
        """
        return None

    def needs_probabilities(self, call: AttentionCall) -> bool:
        """True to compute explicit float32 probabilities (and call `rescale`) instead of SDPA."""
        return False

    def rescale(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        """Edit explicit probabilities (B, heads, N_q, N_k); return the tensor to mix values with."""
        return probs

    def capture(self, call: AttentionCall) -> None:
        """Read what the method needs from the call after the attention was computed."""

    def begin_forward(self) -> None:
        """Called before every denoiser forward, eagerly (outside any compiled region), after
        the state was updated: prepare per-forward buffers here so that the layer hooks find the
        same Python structure at every step (no recompilation under torch.compile)."""

    def post(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        """Transform the image-token attention output (B, N_img, C) before the residual add."""
        return output


def combine_masks(model_mask: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Sum the model's own float mask and a controller bias, finite in `dtype`."""
    if bias is None:
        return model_mask
    bias = bias.to(dtype)
    while bias.ndim < 4:  # accept (N_k,), (N_q, N_k), ... and make it (…, N_q, N_k) 4-D for slicing
        bias = bias.unsqueeze(0)
    if model_mask is None:
        return bias
    # two dtype-min values would overflow to -inf; keep the sum finite
    return (model_mask.to(dtype) + bias).clamp_min(masked_value(dtype))


def controlled_attention(controller: AttentionController, call: AttentionCall) -> torch.Tensor:
    """Attention output (B, heads, N_q, head_dim) of a selected layer, with the controller's hooks."""
    q, k, v = call.query, call.key, call.value
    call.attn_mask = combine_masks(call.attn_mask, controller.bias(call), q.dtype)
    call.logit_scale = controller.softmax_scale(call)
    out = controller.attend(call)
    if out is None and controller.needs_probabilities(call):
        logits = q.float() @ (k.float() * call.scale).transpose(-1, -2)
        if call.attn_mask is not None:
            logits = logits + call.attn_mask.float()
        call.probs = controller.rescale(call, logits.softmax(-1))
        out = call.probs.to(v.dtype) @ v
    elif out is None:
        out = call.sdpa(q, k, v, attn_mask=call.attn_mask, scale=call.logit_scale)
    controller.capture(call)
    return out


def _denoiser_state_hook(controller: AttentionController, signature: inspect.Signature, track_steps: bool):
    state = controller.state

    @torch.compiler.disable
    def hook(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        sample = bound.get("sample", bound.get("hidden_states"))
        img_ids = bound.get("img_ids")
        if torch.is_tensor(sample):
            state.batch_size, state.device = int(sample.shape[0]), sample.device
        if img_ids is not None:  # FLUX: packed tokens; the grid is in the position ids
            state.set_position_ids(img_ids)
            state.latent_hw  # resolved here, outside any compiled region (once per ids tensor)
            text = bound.get("encoder_hidden_states")
            state.n_txt = None if text is None else text.shape[1]
        elif sample is not None and sample.ndim == 4:
            state.latent_hw = tuple(sample.shape[-2:])
            state.frames = 1
        elif sample is not None and sample.ndim == 5:  # video: (B, C, F, H, W)
            state.latent_hw = tuple(sample.shape[-2:])
            state.frames = int(sample.shape[2])
        timestep = bound.get("timestep")
        if track_steps and timestep is not None:
            state.begin_step(timestep)
        controller.begin_forward()
        return None

    return hook


def attention_layer_names(denoiser: torch.nn.Module) -> list[str]:
    """Names of the attention layers of a UNet or transformer, e.g. '...transformer_blocks.0.attn2'."""
    return [name for name, module in denoiser.named_modules() if hasattr(module, "set_processor")]


@contextmanager
def attach(denoiser: torch.nn.Module, controller: AttentionController, track_steps: bool = True) -> Iterator[AttentionController]:
    """Install `controller`'s processors on `denoiser` (a UNet or a transformer) for one call.

    Only layers with ``controller.select(name)`` get a controlled processor; every other layer
    keeps its processor object.  On exit the original objects are restored, also on exceptions.
    With `track_steps=False` the caller owns the denoising loop and sets ``state.step`` itself.
    A ``torch.compile(denoiser)`` wrapper is accepted: the processors go on the module it wraps.
    """
    from .processors import controlled_processor_for

    denoiser = getattr(denoiser, "_orig_mod", denoiser)
    # Swap processors on the selected attention modules only.  (set_attn_processor would walk
    # the whole model twice per call and needs a complete dict; this is one walk.)
    originals = []
    for name, module in denoiser.named_modules():
        if hasattr(module, "set_processor") and controller.select(name):
            originals.append((name, module, module.get_processor()))
    if not originals:
        raise ValueError(f"{type(controller).__name__} selected none of the attention layers")
    signature = inspect.signature(denoiser.forward)
    handle = denoiser.register_forward_pre_hook(
        _denoiser_state_hook(controller, signature, track_steps), with_kwargs=True
    )
    try:
        for name, module, stock in originals:
            module.set_processor(controlled_processor_for(name, stock, controller))
        yield controller
    finally:
        handle.remove()
        for _, module, stock in originals:
            module.set_processor(stock)
