"""Attention control for diffusers models: one core, thin method policies on top.

Pure torch + diffusers: nothing here knows a pipeline, a file, a CLI or Gradio.

- `core`: `AttentionController` (the protocol every method implements), `ControlState`,
  `AttentionCall`, and `attach`, the context manager that installs processors for one call.
- `processors`: the controlled processors for each attention shape (UNet/PixArt, SD3, FLUX).
- `grids`: token grids from the latent size, mask and map resizing.
- `layers`: the layer vocabulary: a parser of diffusers attention-layer names and the named layer
  sets (cross/self/joint attention, UNet sections and levels, transformer depth thirds) that
  every method policy selects from.
- `heatmaps`: cross-attention heatmaps (DAAM), the first method built on the core.
"""

from .core import AttentionCall, AttentionController, ControlState, attach, attention_layer_names
from .grids import mask_to_tokens, resize_to_grid, token_grid

__all__ = [
    "AttentionCall",
    "AttentionController",
    "ControlState",
    "attach",
    "attention_layer_names",
    "mask_to_tokens",
    "resize_to_grid",
    "token_grid",
]
