"""Video attention policies: Tune-A-Video's sparse-causal self-attention and ReAtCo's RAD capture.

Both run on the UNet of `pipelines.video.inflate` (a 2-D UNet whose layers see the frames of a
clip folded into the batch: B * F rows, each batch row's frames contiguous, each row role's rows
contiguous).  The frame count F comes from the per-call `ControlState.frames`, which `attach`'s
pre-hook reads from the 5-D model input (B, C, F, H, W); nothing here infers it from shapes.
AnimateDiff's motion UNet (pipelines/video/motion.py) folds its frames in the same layout itself;
there the controller gets no sparse-causal layers (AnimateDiff keeps per-frame self-attention)
and only the RAD capture below runs.

`SparseCausalAttention` (every ``attn1``): the query of frame f attends to the keys and values of
frame 0 and frame max(f - 1, 0) of the same clip (or window), concatenated: 2N keys, never F * N.
It runs through the project's fused path (`AttentionCall.sdpa`, i.e. diffusers' dispatcher with
the layer's backend), with no explicit probabilities.

`ReAtCoAttention` adds RAD's capture on the few cross-attention layers it is given (`capture`):
while `capturing` is on (the conditional gradient pass), those layers take the explicit float32
probability path of `core.controlled_attention` and their head-mean probabilities
(B * F, N, 77) stay in the autograd graph; every other layer keeps fused attention.  While it is
off (the guidance pass) the capture layers run fused too, and, if `heat_columns` is set, the
conditional rows' probabilities on those columns are kept (detached) for the per-word heatmap
video: each layer call appends its (frames, N, columns) map to a per-forward list, and the caller
folds the list into the clip's running sum after the forward (`fold_heat(start)`, eagerly; the
sampler knows which clip frames the forward held).

torch.compile.  The layer calls read only per-edit Python values (the frame count, the capture
flag and the layer names, constant within a window and a pass) and keep their results in lists
that are the same objects at every forward, so a compiled block (`compile_repeated_blocks`, what
`--compile` does) has no graph break and the next denoising step reuses its graphs: one graph per
distinct block and pass (the gradient pass and the guided pass differ in rows and in gradients),
never per step or per window.  RAD's early exit is a forward hook on the UNet block holding the
last capture layer (`pipelines/video/reatco.py`), outside the compiled transformer blocks.

`box_loss` is RAD's loss on those maps (docs/methods/video.md, "RAD"): columns 0 and the last
dropped, x100 re-softmax, a separable 3-D Gaussian over (frames, h, w), top-k means inside and
outside each box, hinge terms.  `smooth_3d` is the Gaussian.

The temporal attention blocks of the inflated UNet (``...transformer_blocks.T.attn_temp``) are
diffusers `Attention` modules too, so they show up in `attention_layer_names`; the layer
vocabulary does not parse them (their kind is neither attn1 nor attn2), so no named set selects
them and they keep their stock fused processor.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .core import AttentionCall, AttentionController, ControlState

__all__ = ["ReAtCoAttention", "SparseCausalAttention", "box_loss", "gaussian_weights", "smooth_3d", "sparse_causal"]


def sparse_causal(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B * F, heads, N, D) keys or values -> (B * F, heads, 2N, D): frame f gets [x_0 | x_max(f-1, 0)]."""
    rows = x.shape[0]
    if frames < 1 or rows % frames:
        raise ValueError(f"{rows} batch rows do not hold whole clips of {frames} frames")
    clips = x.view(rows // frames, frames, *x.shape[1:])
    previous = torch.clamp(torch.arange(frames, device=x.device) - 1, min=0)
    first = clips[:, :1].expand_as(clips)
    joined = torch.cat([first, clips[:, previous]], dim=-2)
    return joined.reshape(rows, x.shape[1], 2 * x.shape[2], x.shape[3])


class SparseCausalAttention(AttentionController):
    """Tune-A-Video's sparse-causal attention on the self-attention layers `self_layers`."""

    def __init__(self, self_layers: Iterable[str], state: ControlState | None = None):
        super().__init__(state)
        self.self_layers = frozenset(self_layers)

    def select(self, name: str) -> bool:
        return name in self.self_layers

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        if call.name not in self.self_layers or call.kind != "self":
            return None
        if call.attn_mask is not None:
            raise ValueError(f"{call.name}: sparse-causal attention takes no attention mask")
        frames = self.state.frames
        key, value = sparse_causal(call.key, frames), sparse_causal(call.value, frames)
        return call.sdpa(call.query, key, value, scale=call.logit_scale)


class ReAtCoAttention(SparseCausalAttention):
    """Sparse-causal self-attention plus RAD's cross-attention capture (see the module docstring).

    capture_layers: the cross-attention layers whose probabilities RAD reads (one token grid).
    capturing: on for the gradient pass (explicit probabilities kept in the graph), off otherwise.
    heat_columns: text-key columns whose conditional-row probabilities are summed (detached) on
        the capture layers while not capturing: each forward's maps wait in a list until
        `fold_heat(start)` adds them to `heat` (frames, N, len(columns)) at the clip frames the
        forward held.
    """

    def __init__(self, self_layers: Iterable[str], capture_layers: Iterable[str],
                 state: ControlState | None = None):
        super().__init__(self_layers, state)
        self.capture_layers = frozenset(capture_layers)
        if not self.capture_layers:
            raise ValueError("RAD needs at least one cross-attention layer to capture")
        self.capturing = False
        self.maps: list[torch.Tensor] = []  # this forward's head-mean probabilities, one per layer
        self.heat_columns: torch.Tensor | None = None
        self.heat: torch.Tensor | None = None
        self.heat_count: torch.Tensor | None = None
        self._heat_pending: list[torch.Tensor] = []  # this forward's maps; the same list every forward

    def select(self, name: str) -> bool:
        return name in self.self_layers or name in self.capture_layers

    def begin_forward(self) -> None:
        self.maps = []
        self._heat_pending.clear()  # left by a forward that did not finish: never folded into another

    def needs_probabilities(self, call: AttentionCall) -> bool:
        return self.capturing and call.name in self.capture_layers

    def capture(self, call: AttentionCall) -> None:
        if call.name not in self.capture_layers:
            return
        if call.probs is not None:
            self.maps.append(call.probs.mean(1))  # (B * F, N, 77), float32, in the graph
        elif self.heat_columns is not None and not self.capturing:
            with torch.no_grad():
                probs = call.text_probs(rows=call.rows("cond")).mean(1)[..., self.heat_columns]
                self._heat_pending.append(probs.float())

    def fold_heat(self, start: int) -> None:
        """Add this forward's heat maps to `heat` at clip frames start.. (eagerly, after the forward)."""
        if not self._heat_pending:
            return
        if self.heat is None:
            raise RuntimeError("start_heat() must size the heatmap buffer first")
        maps = self._heat_pending
        if any(m.shape[1] != self.heat.shape[1] for m in maps):  # capture layers share one grid
            raise ValueError("the capture layers must share one token grid")
        frames = maps[0].shape[0]
        self.heat[start:start + frames] += torch.stack(maps).sum(0).to(self.heat.device)
        self.heat_count[start:start + frames] += len(maps)
        maps.clear()

    def start_heat(self, columns: Sequence[int], frames: int, tokens: int, device) -> None:
        """Sum the conditional probabilities of `columns` on the capture layers from now on."""
        self.heat_columns = torch.as_tensor(list(columns), dtype=torch.long, device=device)
        self.heat = torch.zeros(frames, tokens, len(columns), device=device)
        self.heat_count = torch.zeros(frames, 1, 1, device=device)

    def attention_maps(self) -> torch.Tensor:
        """The mean of this forward's captured maps over the capture layers, (B * F, N, 77)."""
        if len(self.maps) != len(self.capture_layers):
            raise RuntimeError(f"{len(self.maps)} of the {len(self.capture_layers)} capture layers ran in this forward")
        return torch.stack(self.maps).mean(0)


# ----------------------------------------------------------------------------- RAD's loss


def gaussian_weights(sigma: float, size: int = 3) -> torch.Tensor:
    """The normalised 1-D kernel of `size` taps of the Attend-and-Excite smoothing utility the
    reference shares: exp(-(x / (2 sigma))^2), i.e. a Gaussian of standard deviation sigma * sqrt(2)
    (sigma 0.5: [0.2119, 0.5761, 0.2119])."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    return (g / g.sum()).float()


def smooth_3d(maps: torch.Tensor, sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """(K, F, h, w) maps smoothed by a separable 3-D Gaussian over (frames, h, w).

    Reflect padding of size // 2 on each axis, as the reference; an axis shorter than that pad
    plus one (a one-frame window, a one-cell grid) is padded by replication instead.
    """
    weights = gaussian_weights(sigma, size).to(maps.device, maps.dtype)
    pad = size // 2
    x = maps.unsqueeze(1)  # (K, 1, F, h, w)
    for axis in range(3):
        length = x.shape[2 + axis]
        pads = [0, 0, 0, 0, 0, 0]
        pads[2 * (2 - axis)] = pads[2 * (2 - axis) + 1] = pad
        x = F.pad(x, pads, mode="reflect" if length > pad else "replicate")
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = size
        x = F.conv3d(x, weights.view(shape))
    return x.squeeze(1)


def _topk_mean(values: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per frame: the mean of the top max(1, floor(fraction * |mask|)) values of `values` where
    `mask` (F, h, w); 0 for a frame whose mask is empty."""
    out = []
    for v, m in zip(values, mask):
        chosen = v[m]
        if chosen.numel() == 0:
            out.append(v.sum() * 0)
            continue
        k = max(1, int(fraction * chosen.numel()))
        out.append(chosen.topk(k).values.mean())
    return torch.stack(out)


def box_loss(maps: torch.Tensor, tokens: Sequence[Sequence[int]], inside: torch.Tensor, *, topk: float = 0.2,
             temperature: float = 100.0, sigma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """RAD's loss L and L_max on cross-attention maps.

    maps: (F, h, w, T) probabilities over the T text keys (T = 77 for CLIP); tokens: per target,
    its token positions in the prompt (positions count the start token as 0; several positions
    are a multi-token word, whose map is the max of its sub-token maps); inside: (K, F, h, w)
    bool masks of the targets' boxes on the grid.  Returns (L, L_max, {"fg": (K,), "bg": (K,)}).
    """
    if len(tokens) != inside.shape[0]:
        raise ValueError(f"{len(tokens)} targets but {inside.shape[0]} box masks")
    n_keys = maps.shape[-1]
    # drop the start token (column 0) and the last column, sharpen, re-softmax over the rest
    probs = (maps[..., 1:n_keys - 1] * temperature).softmax(-1)
    per_target = []
    for positions in tokens:
        columns = [p - 1 for p in positions]
        if not columns or min(columns) < 0 or max(columns) >= n_keys - 2:
            raise ValueError(f"token positions {list(positions)} lie outside the prompt's keys")
        per_target.append(probs[..., columns].amax(-1))
    smoothed = smooth_3d(torch.stack(per_target), sigma)  # (K, F, h, w)
    fg = torch.stack([_topk_mean(v, m, topk).mean() for v, m in zip(smoothed, inside)])
    bg = torch.stack([_topk_mean(v, ~m, topk).mean() for v, m in zip(smoothed, inside)])
    loss = (1 - fg).clamp_min(0).sum() + bg.clamp_min(0).sum()
    return loss, (1 - fg).max(), {"fg": fg.detach(), "bg": bg.detach()}
