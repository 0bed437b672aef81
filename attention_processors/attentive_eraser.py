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
masked if any of its pixels is).  They are built once per grid per call.  A grid on which a
sample's mask covers every token would leave no key to attend to: that sample attends normally
at that resolution (logged once).  A sample whose mask is empty is not edited.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

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
    # per-sample path: a float bias per dtype, built on first use
    bias: dict
    # similarity suppression: the query rows that are in the mask of some sample
    in_queries: torch.Tensor | None  # (N_in,) long
    in_select: torch.Tensor | None  # (B, 1, N_in, 1) bool, None on the shared-mask path

    def bias_for(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.bias:
            value = torch.zeros(self.tokens.shape, dtype=dtype, device=self.tokens.device)
            value.masked_fill_(self.tokens, masked_value(dtype))
            self.bias[dtype] = value[:, None, None, :]
        return self.bias[dtype]


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
        self.warnings: list[str] = []
        #: (step, "aas" | "ss") -> number of layer calls that applied it (for tests and logs)
        self.counts: Counter = Counter()

    # ------------------------------------------------------------------ layer selection

    def select(self, name: str) -> bool:
        return self._layers(name)

    def ss_active(self, step: int) -> bool:
        return self.ss_scale != 1.0 and 0 <= step <= self.ss_steps

    def aas_active(self, step: int) -> bool:
        return self.aas_steps is None or self.aas_steps(step)

    # ------------------------------------------------------------------ token masks

    def grid_masks(self, grid: tuple[int, int], n_rows: int, device: torch.device) -> GridMasks:
        """The masks of `n_rows` edited samples on `grid` (cached per call)."""
        key = (grid, n_rows, device)
        cached = self._grids.get(key)
        if cached is not None:
            return cached
        masks = self.masks
        if masks.shape[0] == 1 and n_rows > 1:
            masks = masks.expand(n_rows, -1, -1)
        elif masks.shape[0] != n_rows:
            raise ValueError(f"{masks.shape[0]} masks for {n_rows} edited rows")
        pooled = F.adaptive_max_pool2d(masks[:, None].to(device=device, dtype=torch.float32), grid)
        tokens = (pooled > 0).flatten(1)  # (B, N)
        # one device read for the whole grid: which samples are empty, full, or share one mask
        any_masked, all_masked = tokens.any(1), tokens.all(1)
        same = bool((tokens == tokens[:1]).all()) if n_rows > 1 else True
        any_list, all_list = any_masked.tolist(), all_masked.tolist()
        for sample, full in enumerate(all_list):
            if full:
                message = (
                    f"the mask covers every token of the {grid[0]}x{grid[1]} attention grid "
                    f"(sample {sample}); that resolution attends normally"
                )
                self.warnings.append(message)
                logger.warning(message)
        edited = any_masked & ~all_masked
        tokens = tokens & edited[:, None]
        n_edited = sum(a and not f for a, f in zip(any_list, all_list))
        if n_edited == 0:
            gm = GridMasks(grid, tokens, edited, False, None, {}, None, None)
        elif same and n_edited == n_rows:
            gm = GridMasks(
                grid, tokens, edited, True,
                keep_keys=(~tokens[0]).nonzero().squeeze(1),
                bias={},
                in_queries=tokens[0].nonzero().squeeze(1),
                in_select=None,
            )
        else:
            in_queries = tokens.any(0).nonzero().squeeze(1)
            gm = GridMasks(
                grid, tokens, edited, True,
                keep_keys=None,
                bias={},
                in_queries=in_queries,
                in_select=tokens[:, in_queries][:, None, :, None],
            )
        self._grids[key] = gm
        return gm

    # ------------------------------------------------------------------ the attention

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        roles = call.state.row_roles
        if AAS not in roles or call.kind != "self":
            return None
        step = call.state.step
        if not self.aas_active(step):
            return None
        rows = call.rows(AAS)
        n_rows = rows.stop - rows.start
        gm = self.grid_masks(call.grid, n_rows, call.query.device)
        if not gm.any_edited:
            return None
        pieces = []
        for role in roles:
            r = call.rows(role)
            if role == AAS:
                pieces.append(self._aas(call, r, gm, step))
            else:
                pieces.append(call.sdpa(
                    call.query[r], call.key[r], call.value[r],
                    attn_mask=_mask_rows(call.attn_mask, r), scale=call.logit_scale,
                ))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _aas(self, call: AttentionCall, rows: slice, gm: GridMasks, step: int) -> torch.Tensor:
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
        self.counts[(step, "aas")] += 1
        if self.ss_active(step) and gm.in_queries is not None and gm.in_queries.numel():
            idx = gm.in_queries
            q_in = q.index_select(2, idx)
            bias_in = bias
            if bias is not None and bias.shape[-2] != 1:  # a per-query model mask: keep its rows
                bias_in = bias.index_select(-2, idx)
            out_in = call.sdpa(q_in, k, v, attn_mask=bias_in, scale=self.ss_scale * call.scale)
            if gm.in_select is not None:  # samples differ: only their own in-mask rows change
                out_in = torch.where(gm.in_select, out_in, out.index_select(2, idx))
            out = out.index_copy(2, idx, out_in)
            self.counts[(step, "ss")] += 1
        return out


def _mask_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    if mask is None or mask.shape[0] == 1:
        return mask
    return mask[rows]
