"""Cross-attention heatmaps (what DAAM does), as a capture-only controller.

For every selected text-attention layer and every denoising step, take the attention of the
image queries of the conditional rows on the text keys, average the heads at once and add the
(h, w) map of that layer to a running sum kept per token grid.  Resizing is linear, so the sums
are resized to the denoiser's input grid once, at the end.  Nothing else is stored: memory is one
(batch, tokens, h, w) float32 buffer per grid size, whatever the number of layers and steps.  The model output is untouched (SDPA still computes it).

Differences from DAAM (Tang et al., 2023), all deliberate:
- maps are resized bilinearly to the latent grid (DAAM: bicubic to 64x64), so non-square images
  keep their aspect ratio;
- joint-attention models (SD3, FLUX) have no cross-attention; there the map is the softmax over
  the chosen part of the text keys only (RefAM's `text_softmax`; `norm="full_row"` gives the
  true joint probabilities at the price of a chunked normaliser per layer).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from . import layers as _layers
from .core import AttentionCall, AttentionController, ControlState
from .grids import GridSums

LAYER_GROUPS = ("all", "down", "mid", "up")
# the heatmaps' transformer groups are the depth thirds of `layers.third`, split by partition
_THIRD_OF_GROUP = {"down": "first", "mid": "middle", "up": "last"}


def text_attention_layers(layer_names: Iterable[str], where: str = "all") -> set[str]:
    """The text-attention layers among `layer_names`, restricted to a part of the network.

    Text attention (`layers.text_attention`): UNet/PixArt cross-attention (attn2) and SD3/FLUX
    joint attention (attn).  SD3.5's `attn2` is image-only self-attention: it is selected by name
    but skipped at capture because its calls carry no text keys.

    UNets: "down", "mid", "up" are their blocks.  Transformers (PixArt, SD3, FLUX) have no such
    blocks; there the three groups are the first, middle and last third of the blocks in
    execution order (FLUX runs every dual-stream block before the single-stream ones), cut by
    `layers.third`'s "partition" rule: every group holds at least one block.
    """
    if where not in LAYER_GROUPS:
        raise ValueError(f"unknown layer group {where!r}; choose one of {', '.join(LAYER_GROUPS)}")
    names = _layers.text_attention(layer_names)
    if where == "all":
        return set(names)
    if _layers.select(names, section=_layers.UNET):
        return set(_layers.select(names, section=where))
    return set(_layers.in_third(names, _THIRD_OF_GROUP[where], rule="partition"))


class CrossAttentionHeatmaps(AttentionController):
    """Accumulate head-averaged text attention maps of one batch role over layers and steps.

    layers: names of the layers to capture (see `text_attention_layers`).
    role: which batch rows to read (the pipeline declares ``state.row_roles``).
    text_part: which text keys are the prompt's tokens, relative to the text sequence (SD3's
        first 77 keys are CLIP tokens, then T5; None: all).  In joint layers the softmax is taken
        over this part; in cross-attention layers over all keys (the true probabilities).
    keep: keep only the first `keep` tokens of `text_part` (the prompt and its end token):
        padding columns are never accumulated.
    steps: predicate on the step index (None: every step).  A Python predicate reads the step
        as an int (one device read per layer call, a graph break under torch.compile).
    """

    def __init__(
        self,
        layers: set[str],
        role: str = "cond",
        text_part: slice | None = None,
        keep: int | None = None,
        steps: Callable[[int], bool] | None = None,
        norm: str = "text_softmax",
        state: ControlState | None = None,
    ):
        super().__init__(state)
        self.layers = set(layers)
        self.role = role
        self.text_part = text_part
        self.keep = keep
        self.steps = steps
        self.norm = norm
        # running (batch, N_img, tokens) sums per token grid, resized once in maps()
        self._sums = GridSums()
        self._count = 0
        # this forward's sums and count: empty at the start of every forward (`begin_forward`), so
        # compiled layers see the same Python structure at every step; folded into the totals eagerly
        self._forward_sums = GridSums()
        self._forward_count = 0

    def select(self, name: str) -> bool:
        return name in self.layers

    def begin_forward(self) -> None:
        self._fold()

    def _fold(self) -> None:
        pending = self._forward_sums._sums  # GridSums' dict, emptied in place (same object every forward)
        for grid, value in pending.items():
            self._sums.add(grid, value)
        pending.clear()
        self._count += self._forward_count
        self._forward_count = 0

    @property
    def count(self) -> int:
        """Number of layer calls captured so far."""
        self._fold()
        return self._count

    def _wanted(self, call: AttentionCall) -> bool:
        return call.text_keys is not None and (self.steps is None or self.steps(call.state.step))

    # needs_probabilities stays False: every layer keeps its fused attention, and the capture
    # computes only the conditional rows' image-query x text-key slice.  (Explicit probabilities
    # for the whole cross-attention would save that one small q.k, but cost more kernels than
    # they save: softmax, two batched matmuls and copies instead of one fused call.)

    def capture(self, call: AttentionCall) -> None:
        if not self._wanted(call):
            return
        rows = call.rows(self.role)
        with torch.no_grad():
            if call.kind == "cross":  # every key is text: true probabilities over all of them
                probs = call.text_probs(rows)[..., self.text_part or slice(None)]
            else:
                probs = call.text_probs(rows, keys=self.text_part, norm=self.norm)
            probs = probs[..., : self.keep]
            self._forward_sums.add(call.grid, probs.mean(1))  # heads first: (b, N_img, T)
            self._forward_count += 1

    def maps(self) -> torch.Tensor:
        """Mean map per kept token, float32 (batch, tokens, H_latent, W_latent)."""
        self._fold()
        if not self._sums:
            raise RuntimeError("no attention was captured: no selected layer ran")
        return self._sums.combined(tuple(self.state.latent_hw)) / self.count
