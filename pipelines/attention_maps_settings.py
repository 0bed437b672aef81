"""Attention maps' settings: the one place their defaults live (see pipelines/attention_maps.py
and docs/methods/attention_maps.md).

Kept apart from the pipeline so that the command line can build its flags and show the defaults
in `--help` without importing torch and diffusers.  A None default means "the model's own":
steps and guidance from `models.generation_defaults` (the model folder's training.json, else
SD's), the size from the model's sample size.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import Settings, setting

#: Parts of the network whose text-attention layers are averaged; the groups of
#: `attention_processors.heatmaps.text_attention_layers` (a test keeps the two in step; that
#: module imports torch, this one must not).
LAYER_GROUPS = ("all", "down", "mid", "up")
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MIN_SIDE, MAX_SIDE = 64, 2048


@dataclass(frozen=True)
class AttentionMapSettings(Settings):
    """How an image and its word heatmaps are made: the one place the defaults live; the CLI
    flags and the tab's controls are made from these fields."""

    negative_prompt: str = setting("", "what to avoid (classifier-free guidance's negative prompt; "
                                       "FLUX takes none)", label="The negative prompt")
    steps: int | None = setting(None, "denoising steps (default: the model's own)", label="Steps",
                                minimum=1, maximum=MAX_STEPS, step=1)
    guidance: float | None = setting(None, "classifier-free guidance scale (default: the model's own)",
                                     label="Guidance", minimum=0, maximum=MAX_GUIDANCE, step=0.5)
    height: int | None = setting(None, "image height in pixels (default: the model's size)", label="Height",
                                 minimum=MIN_SIDE, maximum=MAX_SIDE, step=8)
    width: int | None = setting(None, "image width in pixels (default: the model's size)", label="Width",
                                minimum=MIN_SIDE, maximum=MAX_SIDE, step=8)
    layers: str = setting("all", "which text-attention layers to average: all, or the down, mid or up part "
                                 "(transformers: the first, middle or last third of the blocks)",
                          label="Layers", choices=LAYER_GROUPS)
    overlay_alpha: float = setting(0.5, "opacity of the heatmap drawn over the image (0: the image only, "
                                        "1: the heatmap only)", label="The heatmap opacity",
                                   minimum=0, maximum=1, step=0.05)


DEFAULTS = AttentionMapSettings()
