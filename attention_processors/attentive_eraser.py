"""Attentive Eraser's AAS (attention activation and suppression), as a policy on the core.

Paper: Attentive Eraser, AAAI 2025 (arXiv 2412.12974); method notes: docs/methods/eraser.md.

The pipeline runs one UNet batch with two row roles, declared in ``state.row_roles``:
``"normal"`` (the plain model) and ``"aas"`` (this policy).  On every decoder self-attention
(``up_blocks.*.attentions.*.transformer_blocks.*.attn1``: `layers.decoder_self_attention`) the ``aas`` rows
attend only to keys outside the object mask, for every query; while ``state.step <= ss_steps``
the queries inside the mask use logits scaled by ``ss_scale`` (similarity suppression, a softmax
temperature of 1/λ), blended per query.  Every other row and layer is untouched.

How it is computed (never an N x N matrix):

- A bias of ``finfo.min`` on the masked keys (the paper's formulation) gives those keys exactly
  zero probability, so it equals attention over the unmasked keys alone.  When every edited
  sample shares one mask (the usual case: one image, one or several seeds) the masked keys are
  simply left out (``index_select`` on K and V) and SDPA runs without a mask, which keeps the
  fused flash kernel and reads fewer keys.  Samples with different masks use the float bias
  (B, 1, 1, N) in ``attn_mask``.
- The λ-scaled variant is SDPA with ``scale = λ / sqrt(d)``, run on the in-mask query rows only
  (gather, SDPA, scatter); out-of-mask rows keep the plain AAS output bit for bit.
- The ``normal`` rows go through the same SDPA call as the stock processor on their own slice.

Token masks come from the latent size in the state (any aspect ratio): for a layer with N tokens
the grid is (ceil(H/2^k), ceil(W/2^k)) and the pixel mask is max-pooled onto it (a token is
masked if any of its pixels is).  They are built once per call, for every grid the latent can
have, before the first forward (`begin_forward`, one device read for all grids).  A grid on which
a sample's mask covers every token would leave no key to attend to: that sample attends normally
at that resolution (logged once, when a layer first uses that grid).  A sample whose mask is empty
is not edited.

torch.compile (fullgraph, no recompilation between steps): a layer call reads only what
`begin_forward` prepared eagerly (the token masks, kept-key and in-mask-query index tensors and
per-sample biases, whose shapes never change, and this step's SS flag as a 0-d bool tensor), so
the shared-mask path still drops the masked keys under compile.  Compiled, SS runs at every
step and is selected with ``torch.where`` on the flag (eager calls skip it when it is off), and
`counts` is folded eagerly from per-forward call numbers.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import grids as _grids
from . import layers as _layers
from .core import AttentionCall, AttentionController, ControlState, masked_value

logger = logging.getLogger(__name__)

NORMAL, AAS = "normal", "aas"


def is_aas_layer(name: str) -> bool:
    """The layers AAS edits: every decoder self-attention of a UNet (paper default, both backbones)."""
    return bool(_layers.decoder_self_attention((name,)))


@dataclass
class GridMasks:
    """The object mask of every edited sample on one token grid (built once per call)."""

    grid: tuple[int, int]
    tokens: torch.Tensor  # (B, N) bool: masked tokens of the samples edited on this grid
    edited: torch.Tensor  # (B,) bool: sample has masked and unmasked tokens here
    any_edited: bool
    # shared-mask path: every sample edited, with one mask
    keep_keys: torch.Tensor | None  # (N_keep,) long: the unmasked keys
    # per-sample path: a float bias per dtype (prepared before a forward, or built on first use)
    bias: dict
    # similarity suppression: the query rows that are in the mask of some sample
    in_queries: torch.Tensor | None  # (N_in,) long
    in_select: torch.Tensor | None  # (B, 1, N_in, 1) bool, None on the shared-mask path
    #: samples whose mask covers every token of this grid (they attend normally here)
    full: tuple[int, ...] = ()
    #: a layer used this grid (set inside the layer call, read only eagerly: warnings)
    used: bool = False
    reported: bool = False

    @property
    def n_in(self) -> int:
        return 0 if self.in_queries is None else int(self.in_queries.shape[0])

    def bias_for(self, dtype: torch.dtype) -> torch.Tensor:
        bias = self.bias.get(dtype)
        if bias is None:
            bias = torch.zeros(self.tokens.shape, dtype=dtype, device=self.tokens.device)
            bias = bias.masked_fill_(self.tokens, masked_value(dtype))[:, None, None, :]
            if not torch.compiler.is_compiling():  # a compiled layer must not grow the cache
                self.bias[dtype] = bias
        return bias


#: the dtypes whose per-sample bias `begin_forward` prepares (a compiled layer finds it ready)
BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AttentiveEraserAAS(AttentionController):
    """AAS on the decoder self-attentions, for the rows whose role is ``"aas"``.

    masks: (B, H, W) object masks of the B edited samples (bool or {0, 1}), at any resolution
        with the image's aspect ratio (the pipeline passes the dilated mask at working size);
        one mask (1, H, W) is shared by every sample.
    ss_steps: similarity suppression is active for steps 0..ss_steps inclusive (paper: 9);
        negative disables it.
    ss_scale: λ, the logit scale of the suppressed variant (paper: 0.3); 1 makes SS a no-op.
    aas_steps: predicate on the step index for AAS itself (None: every executed step, the paper).
    layers: predicate on the layer name (default: `is_aas_layer`).

    torch.compile: `begin_forward` (eager, before every forward) builds the token masks of every
    token grid of the latent (once per call: one device read, and ``nonzero`` for the kept keys
    and in-mask queries, outside the compiled region) and writes this step's SS (and
    `aas_steps`) flags into 0-d bool tensors.  A compiled layer call only reads those prepared
    tensors, whose shapes never change between steps: the kept keys are still dropped from K/V
    (a fixed-size `index_select`), and SS is computed at every step and chosen per query with
    ``torch.where`` on the flag.  Eager calls branch on the Python step instead and skip SS when
    it is off.  `counts` and `warnings` are folded eagerly.
    """

    def __init__(
        self,
        masks: torch.Tensor,
        ss_steps: int = 9,
        ss_scale: float = 0.3,
        aas_steps: Callable[[int], bool] | None = None,
        layers: Callable[[str], bool] | None = None,
        state: ControlState | None = None,
    ):
        super().__init__(state or ControlState(row_roles=(NORMAL, AAS)))
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3:
            raise ValueError(f"masks must be (B, H, W), not {tuple(masks.shape)}")
        if not ss_scale > 0:
            raise ValueError(f"ss_scale must be positive, not {ss_scale}")
        self.masks = masks.detach() > 0.5 if masks.dtype != torch.bool else masks.detach()
        self.ss_steps = int(ss_steps)
        self.ss_scale = float(ss_scale)
        self.aas_steps = aas_steps
        self._layers = layers or is_aas_layer
        self._grids: dict[tuple, GridMasks] = {}
        self._warnings: list[str] = []
        self._counts: Counter = Counter()
        # compiled layer calls: this forward's numbers of AAS calls and of calls that ran SS
        # (applied when the step's flag is on), reset by every `begin_forward` (so a compiled
        # frame finds 0 at every entry) and folded into `counts` with the forward's step
        self._forward_aas = 0
        self._forward_ss = 0
        self._forward_step: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, int, int]] = []
        # this forward's step flags (0-d bool on the input's device, updated in place)
        self._ss_on: torch.Tensor | None = None
        self._aas_on: torch.Tensor | None = None
        self._prepared: tuple | None = None  # (latent_hw, n_rows, device) the grids were prepared for

    # ------------------------------------------------------------------ layer selection

    def select(self, name: str) -> bool:
        return self._layers(name)

    @property
    def ss_enabled(self) -> bool:
        """Whether SS runs at any step (a constant of the controller)."""
        return self.ss_scale != 1.0 and self.ss_steps >= 0

    def ss_active(self, step: int) -> bool:
        return self.ss_enabled and 0 <= step <= self.ss_steps

    def aas_active(self, step: int) -> bool:
        return self.aas_steps is None or self.aas_steps(step)

    # ------------------------------------------------------------------ per forward (eager)

    def begin_forward(self) -> None:
        """Prepare every tensor a (compiled) layer call reads: token masks, biases, step flags."""
        self._close_forward()
        state = self.state
        st = state.step_tensor
        self._forward_step = st.clone()
        if AAS not in state.row_roles or state.batch_size is None or state.latent_hw is None:
            return
        n_roles = len(state.row_roles)
        if state.batch_size % n_roles:
            return
        device = state.device
        n_rows = state.batch_size // n_roles
        prepared = (state.latent_hw, n_rows, device)
        if prepared != self._prepared:  # once per call (the latent, batch and device do not change)
            self._prepared = prepared
            self._prepare(n_rows, device)
        with torch.no_grad():
            if self.ss_enabled:
                self._ss_on = _set_flag(self._ss_on, (st >= 0) & (st <= self.ss_steps), device)
            if self.aas_steps is not None:
                flag = torch.tensor(bool(self.aas_steps(state.step)))
                self._aas_on = _set_flag(self._aas_on, flag, device)
        self._report_used()

    def _prepare(self, n_rows: int, device: torch.device) -> None:
        for grid in self._latent_grids():
            gm = self.grid_masks(grid, n_rows, device)  # the first builds them all (once per call)
            if gm.any_edited and gm.keep_keys is None:
                for dtype in BIAS_DTYPES:
                    gm.bias_for(dtype)

    def _close_forward(self) -> None:
        if self._forward_aas and self._forward_step is not None:
            self._pending.append((self._forward_step, self._forward_aas, self._forward_ss))
        self._forward_aas = self._forward_ss = 0

    @property
    def counts(self) -> Counter:
        """(step, "aas" | "ss") -> number of layer calls that applied it (for tests and logs)."""
        self._close_forward()
        if self._pending:
            steps = torch.stack([s.cpu() for s, _, _ in self._pending]).tolist()  # one read
            for step, (_, n_aas, n_ss) in zip(steps, self._pending):
                if n_aas and self.aas_active(step):
                    self._counts[(step, "aas")] += n_aas
                if n_ss and self.ss_active(step) and self.aas_active(step):
                    self._counts[(step, "ss")] += n_ss
            self._pending.clear()
        return self._counts

    @property
    def warnings(self) -> list[str]:
        """Messages for the user: grids on which a sample's mask covers every token."""
        self._report_used()
        return self._warnings

    def _report_used(self) -> None:
        for gm in self._grids.values():
            if gm.used and not gm.reported:
                self._report(gm)

    def _report(self, gm: GridMasks) -> None:
        gm.reported = True
        for sample in gm.full:
            message = (
                f"the mask covers every token of the {gm.grid[0]}x{gm.grid[1]} attention grid "
                f"(sample {sample}); that resolution attends normally"
            )
            self._warnings.append(message)
            logger.warning(message)

    # ------------------------------------------------------------------ token masks

    def _latent_grids(self) -> list[tuple[int, int]]:
        """Every token grid a layer of this latent can have (`grids.token_grid`'s factors)."""
        h, w = self.state.latent_hw
        grids = []
        for f in _grids._FACTORS:
            grid = (math.ceil(h / f), math.ceil(w / f))
            if grid not in grids:
                grids.append(grid)
        return grids

    def grid_masks(self, grid: tuple[int, int], n_rows: int, device: torch.device) -> GridMasks:
        """The masks of `n_rows` edited samples on `grid` (cached per call).

        The first miss builds every grid of the state's latent at once (one device read);
        `begin_forward` makes that happen before the first forward."""
        cached = self._grids.get((grid, n_rows, device))
        if cached is not None:
            return cached
        grids = [grid]
        if self.state.latent_hw is not None:
            grids += [g for g in self._latent_grids() if g != grid and (g, n_rows, device) not in self._grids]
        for g, gm in zip(grids, self._build(grids, n_rows, device)):
            self._grids[(g, n_rows, device)] = gm
        return self._grids[(grid, n_rows, device)]

    def _build(self, grids: list[tuple[int, int]], n_rows: int, device: torch.device) -> list[GridMasks]:
        masks = self.masks
        if masks.shape[0] == 1 and n_rows > 1:
            masks = masks.expand(n_rows, -1, -1)
        elif masks.shape[0] != n_rows:
            raise ValueError(f"{masks.shape[0]} masks for {n_rows} edited rows")
        pixels = masks[:, None].to(device=device, dtype=torch.float32)
        all_tokens, flags = [], []
        for grid in grids:
            tokens = (F.adaptive_max_pool2d(pixels, grid) > 0).flatten(1)  # (B, N)
            all_tokens.append(tokens)
            flags.append(torch.stack([tokens.any(1), tokens.all(1), (tokens == tokens[:1]).all(1)]))
        # one device read for every grid: which samples are empty, full, or share one mask
        flag_lists = torch.stack(flags).tolist()
        built = []
        for grid, tokens, (any_list, all_list, same_list) in zip(grids, all_tokens, flag_lists):
            any_masked, all_masked = tokens.any(1), tokens.all(1)
            full = tuple(sample for sample, f in enumerate(all_list) if f)
            edited = any_masked & ~all_masked
            tokens = tokens & edited[:, None]
            n_edited = sum(a and not f for a, f in zip(any_list, all_list))
            if n_edited == 0:
                gm = GridMasks(grid, tokens, edited, False, None, {}, None, None, full)
            elif all(same_list) and n_edited == n_rows:
                gm = GridMasks(
                    grid, tokens, edited, True,
                    keep_keys=(~tokens[0]).nonzero().squeeze(1),
                    bias={},
                    in_queries=tokens[0].nonzero().squeeze(1),
                    in_select=None,
                    full=full,
                )
            else:
                in_queries = tokens.any(0).nonzero().squeeze(1)
                gm = GridMasks(
                    grid, tokens, edited, True,
                    keep_keys=None,
                    bias={},
                    in_queries=in_queries,
                    in_select=tokens[:, in_queries][:, None, :, None],
                    full=full,
                )
            built.append(gm)
        return built

    # ------------------------------------------------------------------ the attention

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        roles = call.state.row_roles
        if AAS not in roles or call.kind != "self":
            return None
        compiling = torch.compiler.is_compiling()
        # eager: the Python step (no device read when the loop owner sets it); compiled: the
        # tensor flags of `begin_forward`, so that the graph is the same at every step
        step = None if compiling else call.state.step
        gated = compiling and self.aas_steps is not None
        if not compiling and not self.aas_active(step):
            return None
        rows = call.rows(AAS)
        n_rows = rows.stop - rows.start
        gm = self.grid_masks(call.grid, n_rows, call.query.device)
        gm.used = True
        if not compiling and not gm.reported:
            self._report(gm)
        if not gm.any_edited:
            return None
        pieces = []
        for role in roles:
            r = call.rows(role)
            if role == AAS:
                out = self._aas(call, r, gm, step)
                if gated:  # aas_steps under compile: the plain attention where the step's flag is off
                    plain = call.sdpa(call.query[r], call.key[r], call.value[r],
                                      attn_mask=_mask_rows(call.attn_mask, r), scale=call.logit_scale)
                    out = torch.where(self._step_flag("_aas_on", call), out, plain)
                pieces.append(out)
            else:
                pieces.append(call.sdpa(
                    call.query[r], call.key[r], call.value[r],
                    attn_mask=_mask_rows(call.attn_mask, r), scale=call.logit_scale,
                ))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _step_flag(self, name: str, call: AttentionCall) -> torch.Tensor:
        """This forward's flag tensor (or, without a `begin_forward`, computed in the graph)."""
        flag = getattr(self, name)
        if flag is not None and flag.device == call.query.device:
            return flag
        if name == "_ss_on":
            st = call.state.step_tensor.to(call.query.device)
            return (st >= 0) & (st <= self.ss_steps)
        raise RuntimeError("aas_steps under torch.compile needs begin_forward (attach the controller)")

    def _aas(self, call: AttentionCall, rows: slice, gm: GridMasks, step: int | None) -> torch.Tensor:
        q, k, v = call.query[rows], call.key[rows], call.value[rows]
        model_mask = _mask_rows(call.attn_mask, rows)
        if gm.keep_keys is not None and model_mask is None:
            # every sample shares one mask: attend to the unmasked keys only (exactly what the
            # finfo.min bias computes, without a mask, so SDPA keeps its fused kernels)
            k, v = k.index_select(2, gm.keep_keys), v.index_select(2, gm.keep_keys)
            bias = None
        else:
            bias = gm.bias_for(q.dtype)
            if model_mask is not None:
                bias = (model_mask.to(q.dtype) + bias).clamp_min(masked_value(q.dtype))
        out = call.sdpa(q, k, v, attn_mask=bias, scale=call.logit_scale)
        compiling = step is None
        if compiling:
            self._forward_aas += 1
        else:
            self._counts[(step, "aas")] += 1
        if not gm.n_in or not (self.ss_enabled if compiling else self.ss_active(step)):
            return out
        idx = gm.in_queries
        q_in = q.index_select(2, idx)
        bias_in = bias
        if bias is not None and bias.shape[-2] != 1:  # a per-query model mask: keep its rows
            bias_in = bias.index_select(-2, idx)
        out_in = call.sdpa(q_in, k, v, attn_mask=bias_in, scale=self.ss_scale * call.scale)
        if compiling:  # SS on this step's flag; samples differ: only their own in-mask rows change
            select = self._step_flag("_ss_on", call)
            if gm.in_select is not None:
                select = gm.in_select & select
            out_in = torch.where(select, out_in, out.index_select(2, idx))
            self._forward_ss += 1
        else:
            if gm.in_select is not None:  # samples differ: only their own in-mask rows change
                out_in = torch.where(gm.in_select, out_in, out.index_select(2, idx))
            self._counts[(step, "ss")] += 1
        return out.index_copy(2, idx, out_in)


def _set_flag(flag: torch.Tensor | None, value: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """Write a 0-d bool into the same tensor every forward (a compiled layer reads that object)."""
    if flag is None or (device is not None and flag.device != torch.device(device)):
        return value.to(device=device or value.device, dtype=torch.bool).clone()
    return flag.copy_(value)


def _mask_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    if mask is None or mask.shape[0] == 1:
        return mask
    return mask[rows]
