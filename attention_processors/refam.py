"""RefAM's attention policy: image-query x text-key capture, sink handling, one-pass early exit.

RefAM (arXiv 2509.22650) reads where a diffusion transformer's image tokens attend among the text
tokens of a referring expression, after one noisy forward pass.  This module is the policy the
processors of `attention_processors.processors` call on the selected layers; the pipeline that
builds the prompt, noises the latent and turns maps into masks is `pipelines/grounding.py`.

Per captured layer l (FLUX dual- and single-stream blocks, SD3 joint blocks, SD UNet attn2):

1. A_l = head-mean of the image-query x text-key attention of the conditional rows, from
   `AttentionCall.text_probs` (only that slice is computed; stock SDPA still computes the output):
   ``norm="text_softmax"`` (softmax over the text keys only, default), ``"full_row"`` (the true
   joint probabilities, chunked normaliser) or ``"raw"`` (logits, an ablation).
2. Global attention sinks (GAS) in layers at depth >= ``l_gas``: column j is a sink when its mean
   mass mu_j >= tau_mass * median(mu) over the prompt's columns and its spatial coefficient of
   variation cv_j = std_p / mean_p <= tau_cv (`detect_sinks`).  ``gas_mode="exclude"`` drops them
   from this layer's aggregation; ``"suppress"``/``"redirect"`` add a dtype-min bias on the keys
   listed in ``suppress_keys`` for image queries in layers at depth >= l_gas (the pipeline finds
   them in a first observe pass); ``"none"`` ignores sinks.
3. The layer's heatmap: rows renormalised over the prompt's word columns (content, stop words,
   magnets) minus this layer's sinks (``renorm=True``), then the mean over the target (content)
   columns minus sinks (`layer_heat`).  Layers are summed per token grid; UNet grids are resized
   to the finest captured grid when read (`heat`).
4. Early exit: once every selected layer (by name: a set of the layers seen in this forward, so
   the order of execution does not matter) has run in the current forward, `capture` raises the
   private `StopForward`; the pipeline catches it, so the rest of the network never runs.  Eager
   only: under torch.compile the early exit is off and the forward runs to its end (an exception
   raised inside a compiled graph is a graph break).

Optionally (UNet refinement) the head-mean self-attention of ``refine_layers`` (attn1 at one grid)
is accumulated for propagating the heatmap (`self_attention`).

torch.compile.  A layer call stores this layer's results (heatmap, token maps, sink flags,
self-attention) as device tensors in a per-forward list and does nothing data-dependent: the
column selections (visible tokens, sink candidates, suppressed keys) are index tensors computed
from the boolean masks eagerly, when they are set.  The list is empty at the start of every
forward and is folded into the running per-grid sums, the layer count and the (CPU) sink flags
eagerly: in `begin_forward` (the pre-hook, outside any compiled region), when a result is read,
and in eager mode right after each layer call (so eager sums are formed in the same order and
memory as a running sum).  A compiled denoiser forward with RefAM attached therefore has no
graph break, and the next forward (another noise draw, image or frame) finds the same Python
structure and does not recompile.

Deviations (the paper's code is not public; see docs/methods/grounding.md):
- the sink criterion, l_gas, tau_mass, tau_cv and every layer choice are ours (docs/methods/grounding.md);
- our first design renormalised rows over the target columns only; with the default target (every
  content token) that makes every row sum to one and the heatmap constant, and it would undo the
  magnets' competition.  We renormalise over content + stop + magnet columns instead: special,
  padding and sink columns (which soak up mass everywhere) leave the normaliser, magnets stay in
  it, and only target columns are ever averaged into the heatmap;
- ``norm="raw"`` maps are not renormalised (renormalising logits has no meaning);
- the suppression bias has shape (1, 1, N_q, N_k) so that only image queries lose the sink keys
  (as docs/methods/grounding.md says); SDPA then cannot use its flash kernel in those layers.  It is an ablation
  mode, not the default.
"""

from __future__ import annotations

from typing import Iterable

import torch

from . import layers as _layers
from .core import AttentionCall, AttentionController, ControlState, masked_value
from .grids import GridSums

NORMS = ("text_softmax", "full_row", "raw")
GAS_MODES = ("none", "exclude", "suppress", "redirect")


class StopForward(Exception):
    """Raised by `RefAMCapture.capture` after the last selected layer: the forward can stop."""


def detect_sinks(maps: torch.Tensor, candidates: torch.Tensor | None = None, tau_mass: float = 4.0,
                 tau_cv: float = 0.5) -> torch.Tensor:
    """Boolean (..., T) flags of global attention sinks among the columns of `maps` (..., N_img, T).

    mu_j is the mean over image tokens, cv_j = std / mean; a sink has mu_j >= tau_mass times the
    median of mu over the `candidates` columns (default: all) and cv_j <= tau_cv.  Columns outside
    `candidates` are never flagged.
    """
    index = None if candidates is None else _indices(candidates.to(maps.device))
    return _sink_flags(maps, candidates, index, tau_mass, tau_cv)


def _indices(mask: torch.Tensor) -> torch.Tensor:
    """The positions of the True entries of a (T,) mask (eager: `nonzero` has a data-dependent shape)."""
    return torch.nonzero(mask.bool()).flatten()


def _sink_flags(maps: torch.Tensor, candidates: torch.Tensor | None, index: torch.Tensor | None,
                tau_mass: float, tau_cv: float) -> torch.Tensor:
    """`detect_sinks` with the candidates' positions `index` given (static shapes: compile-safe)."""
    mu = maps.mean(-2)
    cv = maps.std(-2, unbiased=False) / mu.abs().clamp_min(1e-12)
    if candidates is None:
        candidates = torch.ones(maps.shape[-1], dtype=torch.bool, device=maps.device)
        chosen = mu
    else:
        candidates = candidates.bool()
        chosen = mu.index_select(-1, index)
    median = chosen.median(-1, keepdim=True).values
    return (mu >= tau_mass * median) & (cv <= tau_cv) & candidates


def layer_heat(maps: torch.Tensor, target: torch.Tensor, among: torch.Tensor | None = None,
               renorm: bool = True) -> torch.Tensor:
    """(..., N_img) mean over the `target` columns of `maps` (..., N_img, T).

    With `renorm`, every row is first renormalised over the `among` columns (default: `target`;
    bool (..., T)), so the mass of the columns outside `among` (special tokens, padding, sinks)
    cannot change the result.  Columns outside `target` never enter the mean.
    """
    among = target if among is None else among
    target = target.to(maps.dtype).unsqueeze(-2)
    if renorm:
        total = (maps * among.to(maps.dtype).unsqueeze(-2)).sum(-1, keepdim=True)
        maps = maps / total.clamp_min(1e-12)
    return (maps * target).sum(-1) / target.sum(-1).clamp_min(1)


class RefAMCapture(AttentionController):
    """Capture image x text attention on `layers` and aggregate RefAM's heatmap.

    layers: {layer name: depth in [0, 1)} of the text-attention layers to capture (execution-
        order position / number of text-attention layers; l_gas compares against it).
    target: bool (T,) columns that may reach the heatmap (content tokens), over `text_part`.
    among: bool (T,) columns rows are renormalised over (content, stop and magnet tokens: the
        magnets stay in the normaliser, where they compete with the content for the mass).
    visible: bool (T,) columns whose per-token maps are kept for display (the prompt's tokens).
    candidates: bool (T,) columns whose median defines a sink's mass threshold (non-padding).
    text_part: slice of the text keys holding these T columns (SD3: CLIP or T5 part).
    suppress_keys: (T,) bool columns to bias away in layers with depth >= l_gas (suppress/redirect).
    refine_layers: self-attention layer names whose head-mean probabilities are accumulated.
    early_exit: raise `StopForward` once every selected layer has run in this forward (eager
        only: a compiled forward runs to its end, see the module docstring).
    """

    def __init__(
        self,
        layers: dict[str, float],
        target: torch.Tensor,
        among: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
        text_part: slice | None = None,
        norm: str = "text_softmax",
        gas_mode: str = "exclude",
        l_gas: float = 0.5,
        tau_mass: float = 4.0,
        tau_cv: float = 0.5,
        renorm: bool = True,
        suppress_keys: torch.Tensor | None = None,
        refine_layers: Iterable[str] = (),
        early_exit: bool = True,
        role: str = "cond",
        state: ControlState | None = None,
    ):
        super().__init__(state)
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
        if gas_mode not in GAS_MODES:
            raise ValueError(f"unknown GAS mode {gas_mode!r}; use one of {', '.join(GAS_MODES)}")
        if not layers:
            raise ValueError("RefAM needs at least one text-attention layer to capture")
        self.layers = dict(layers)
        self.target = target.bool()
        self.among = self.target if among is None else among.bool()
        self.visible = self.target if visible is None else visible.bool()
        self.candidates = candidates
        self.text_part = text_part
        self.norm = norm
        self.gas_mode = gas_mode
        self.l_gas = l_gas
        self.tau_mass = tau_mass
        self.tau_cv = tau_cv
        self.renorm = renorm and norm != "raw"
        self.suppress_keys = suppress_keys
        self.refine_layers = set(refine_layers)
        self.early_exit = early_exit
        self.role = role
        # running sums per token grid: heat (b, N), token maps (b, N, T_visible), self-attention
        self._heat = GridSums()  # (b, N) per grid
        self._tokens = GridSums()  # (b, N, T_visible) per grid
        self._self = GridSums()  # (b, N, N) per grid; only the finest is used
        self._layer_count = 0
        self._self_count = 0
        self.sinks: dict[str, torch.Tensor] = {}  # layer -> (b, T) flags (deep layers only), on the CPU
        self._seen: set[str] = set()
        # this forward's per-layer results, device tensors: empty at the start of every forward
        # (`begin_forward`), so compiled layers see the same Python structure at every forward;
        # folded into the sums above eagerly (`_fold`)
        self._pending: list[tuple[str, tuple[int, int], torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._pending_self: list[tuple[tuple[int, int], torch.Tensor]] = []

    # ------------------------------------------------------------------ column masks
    # The boolean masks a layer call selects columns with are kept with their positions, computed
    # eagerly when a mask is set (`nonzero` inside a compiled layer call would be a graph break).

    @property
    def visible(self) -> torch.Tensor:
        return self._visible

    @visible.setter
    def visible(self, mask: torch.Tensor) -> None:
        self._visible = mask.bool()
        self._visible_index = _indices(self._visible)

    @property
    def candidates(self) -> torch.Tensor | None:
        return self._candidates

    @candidates.setter
    def candidates(self, mask: torch.Tensor | None) -> None:
        self._candidates = None if mask is None else mask.bool()
        self._candidate_index = None if mask is None else _indices(self._candidates)

    @property
    def suppress_keys(self) -> torch.Tensor | None:
        return self._suppress_keys

    @suppress_keys.setter
    def suppress_keys(self, mask: torch.Tensor | None) -> None:
        self._suppress_keys = mask
        index = None if mask is None else _indices(mask)
        self._suppress_index = None if index is None or not index.numel() else index

    @property
    def layer_count(self) -> int:
        """Number of text-attention layer calls captured so far."""
        self._fold()
        return self._layer_count

    # ------------------------------------------------------------------ hooks

    def select(self, name: str) -> bool:
        return name in self.layers or name in self.refine_layers

    def reset_forward(self) -> None:
        """Call before each forward when early exit is on (a new forward sees every layer again)."""
        self._seen.clear()

    def begin_forward(self) -> None:
        self._fold()

    def _fold(self) -> None:
        """Add the pending per-layer results to the running sums (eagerly; in layer order)."""
        for name, grid, heat, tokens, sinks in self._pending:
            if sinks is not None:
                self.sinks[name] = sinks.cpu()
            self._heat.add(grid, heat)
            self._tokens.add(grid, tokens)
            self._layer_count += 1
        self._pending.clear()  # the same list object every forward
        for grid, probs in self._pending_self:
            self._self.add(grid, probs)
            self._self_count += 1
        self._pending_self.clear()

    def _deep(self, name: str) -> bool:
        return self.layers.get(name, -1.0) >= self.l_gas

    def bias(self, call: AttentionCall) -> torch.Tensor | None:
        if self.gas_mode not in ("suppress", "redirect") or self._suppress_index is None:
            return None
        if call.text_keys is None or not self._deep(call.name):
            return None
        part = self.text_part or slice(0, call.text_keys.stop - call.text_keys.start)
        start = call.text_keys.start + (part.start or 0)
        n_q, n_k = call.query.shape[2], call.key.shape[2]
        bias = torch.zeros(1, 1, n_q, n_k, dtype=call.query.dtype, device=call.query.device)
        keys = self._suppress_index.to(call.query.device) + start
        rows = torch.arange(call.image_queries.start, call.image_queries.stop, device=call.query.device)
        bias[0, 0, rows[:, None], keys[None, :]] = masked_value(call.query.dtype)
        return bias

    def capture(self, call: AttentionCall) -> None:
        with torch.no_grad():
            if call.name in self.refine_layers:
                self._capture_self(call)
            elif call.text_keys is not None and call.name in self.layers:
                self._capture_text(call)
        if torch.compiler.is_compiling():
            return  # folded in begin_forward / when read; no early exit inside a compiled graph
        self._fold()
        self._seen.add(call.name)
        if self.early_exit and len(self._seen) == len(self.layers) + len(self.refine_layers):
            self._seen.clear()
            raise StopForward

    def _maps(self, call: AttentionCall) -> torch.Tensor:
        rows = call.rows(self.role)
        if self.norm == "raw":
            return call.text_logits(rows, keys=self.text_part).mean(1)
        if call.kind == "cross" and self.text_part is None:
            return call.text_probs(rows).mean(1)
        return call.text_probs(rows, keys=self.text_part, norm=self.norm).mean(1)

    def _capture_text(self, call: AttentionCall) -> None:
        maps = self._maps(call)  # (b, N_img, T)
        device = maps.device
        target = self.target.to(device)
        keep = target.expand(maps.shape[0], -1)
        among = self.among.to(device).expand(maps.shape[0], -1)
        sinks = None
        if self.gas_mode != "none" and self._deep(call.name):
            candidates, index = self._candidates, self._candidate_index
            if candidates is not None:
                candidates, index = candidates.to(device), index.to(device)
            sinks = _sink_flags(maps, candidates, index, self.tau_mass, self.tau_cv)
            if self.gas_mode == "exclude":
                keep, among = keep & ~sinks, among & ~sinks
        heat = layer_heat(maps, keep, among, self.renorm)
        tokens = maps.index_select(-1, self._visible_index.to(device))
        self._pending.append((call.name, call.grid, heat, tokens, sinks))

    def _capture_self(self, call: AttentionCall) -> None:
        rows = call.rows(self.role)
        q = call.query[rows].float()
        k = call.key[rows].float() * call.scale
        probs = (q @ k.transpose(-1, -2)).softmax(-1).mean(1)  # (b, N, N): this layer only
        self._pending_self.append((call.grid, probs))

    # ------------------------------------------------------------------ results

    def heat(self) -> torch.Tensor:
        """(b, h, w) mean heatmap over the captured layers, on the finest captured grid."""
        return self._combine(self._heat)

    def token_maps(self) -> torch.Tensor:
        """(b, T_visible, h, w) mean per-token maps (before any column was dropped)."""
        return self._combine(self._tokens)

    def self_attention(self) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """Mean head-averaged self-attention (b, N, N) of the refinement layers and its grid."""
        self._fold()
        if not self._self:
            return None
        grid = self._self.finest()
        return self._self.at(grid) / max(1, self._self_count), grid

    def sink_columns(self) -> torch.Tensor | None:
        """(T,) union over deep layers and rows of the columns flagged as sinks, or None."""
        self._fold()
        if not self.sinks:
            return None
        return torch.stack([s.any(0) for s in self.sinks.values()]).any(0)

    def _combine(self, sums: GridSums) -> torch.Tensor:
        self._fold()
        if not sums or not self._layer_count:
            raise RuntimeError("no attention was captured: no selected layer ran")
        return sums.combined() / self._layer_count


# ---------------------------------------------------------------------- layer choice by name

#: RefAM's depth ranges (`layers.THIRDS`, split by `layers.third`'s "depth" rule) and FLUX block
#: families (`layers.BLOCK_FAMILIES`).
DEPTH_RANGES = _layers.THIRDS
BLOCK_FAMILIES = tuple(_layers.BLOCK_FAMILIES)


def choose_layers(names: Iterable[str], depth_range: str = "middle+last", blocks: str = "both",
                  unet_levels: tuple[int, ...] = (1, 2), unet_depth: int | None = None) -> dict[str, float]:
    """{layer: depth} of the text-attention layers RefAM captures, from the model's layer names.

    Transformers (FLUX, SD3): the joint-attention layers (`layers.joint_attention`) whose
    execution-order position / count falls in `depth_range` (a key of DEPTH_RANGES, by
    `layers.third`'s "depth" rule), restricted to dual- or single-stream FLUX blocks by `blocks`.
    UNets: the attn2 layers at the downsampling levels `unet_levels` (level 1 and 2 = the 32x32
    and 16x16 grids of a 64x64 latent), in every block.  Depth is the position among all
    text-attention layers in execution order, so l_gas means the same on every backbone.
    `unet_depth` is the number of UNet down blocks (len(unet.down_blocks)); by default it is read
    from the names (`layers.unet_depth_from_names`), which misses trailing blocks without attention.
    """
    names = list(names)
    if depth_range not in DEPTH_RANGES:
        raise ValueError(f"unknown depth range {depth_range!r}; use one of {', '.join(DEPTH_RANGES)}")
    if blocks not in BLOCK_FAMILIES:
        raise ValueError(f"unknown block family {blocks!r}; use one of {', '.join(BLOCK_FAMILIES)}")
    dit = _layers.execution_order(_layers.joint_attention(names))
    if dit:
        span = _layers.third(len(dit), depth_range, rule="depth")
        family = set(_layers.joint_attention(dit, blocks))
        return {name: i / len(dit) for i, name in enumerate(dit) if i in span and name in family}
    n_levels = unet_depth or _layers.unet_depth_from_names(names)
    cross = _layers.execution_order(_layers.cross_attention(names, section=_layers.UNET))
    chosen = set(_layers.cross_attention(cross, level=tuple(unet_levels), unet_depth=n_levels))
    return {n: i / len(cross) for i, n in enumerate(cross) if n in chosen}


#: Automatic UNet level choice: the levels whose token grid has this many cells per side.  SD 1.5
#: at 512 px (64x64 latent) gets levels 1 and 2 (32 and 16 cells, the paper's layers), SD 2.1 at
#: 768 px the same levels (48 and 24).
AUTO_GRID_SIDES = (16, 48)


def auto_unet_levels(names: Iterable[str], latent_side: int, unet_depth: int | None = None) -> tuple[int, ...]:
    """UNet levels to capture when none are given: those with cross-attention whose grid side
    (latent side / 2^level) lies in AUTO_GRID_SIDES; if none does (a small model at a small
    size), the finest level with cross-attention."""
    names = list(names)
    n_levels = unet_depth or _layers.unet_depth_from_names(names)
    levels = _layers.unet_levels(names, n_levels)
    low, high = AUTO_GRID_SIDES
    chosen = tuple(level for level in levels if low <= latent_side / 2**level <= high)
    return chosen or tuple(levels[:1])


def self_attention_layers(names: Iterable[str], level: int, unet_depth: int | None = None) -> list[str]:
    """UNet attn1 layers at downsampling `level` (for refinement by self-attention propagation)."""
    names = list(names)
    n_levels = unet_depth or _layers.unet_depth_from_names(names)
    return _layers.self_attention(names, level=level, unet_depth=n_levels)
