"""Instruction edit's settings (SaaS, self-adaptive attention scaling): the one place their
defaults live (see pipelines/instruct.py and docs/methods/instruction.md).

Kept apart from the pipeline so that the command line can build its flags and show the
defaults in `--help` without importing torch and diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from .settings import Settings, setting

GAIN_MODES = ("equalize", "fixed", "sink_ratio")
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
#: most sub-instructions one instruction may have (the model's 77-token window ends them sooner)
MAX_PARTS = 8


@dataclass(frozen=True)
class InstructSettings(Settings):
    """Instruction edit's settings.  SaaS's own (window, scale) are the paper's; the gain rule
    and its cap are our choices for SD-family models, where the image enters by channel
    concatenation and has no attention tokens to compete with (docs/methods/instruction.md)."""

    steps: int | None = setting(None, "denoising steps (default: the model's; builtin-edit 25)", label="Steps",
                                minimum=2, maximum=MAX_STEPS, step=1)
    guidance: float | None = setting(None, "instruction (text) guidance scale (default: the model's; 7.5)",
                                     label="The instruction guidance", minimum=1, maximum=MAX_GUIDANCE, step=0.5)
    image_guidance: float | None = setting(None, "image guidance scale: how closely to keep the source (default: "
                                                 "the model's; 1.5)", label="The image guidance", minimum=1,
                                           maximum=MAX_GUIDANCE, step=0.1)
    saas: bool = setting(True, "self-adaptive attention scaling (off: plain sampling, the baseline)", label="SaaS")
    window: float = setting(0.4, "fraction of the steps SaaS measures and rescales in (paper: 20 of 50)",
                            label="The SaaS window", above=0, maximum=1, step=0.05)
    scale: float = setting(1.0, "extra factor on every gain (paper: 1.0)", label="The gain scale", above=0,
                           maximum=10, step=0.1)
    gain: str = setting("equalize", "gain rule: equalize the parts' attention (ours, default), a fixed gain, or "
                                    "the start token's share (the paper's image-token rule, transposed)",
                        label="The gain rule", choices=GAIN_MODES)
    max_gain: float = setting(3.0, "largest gain (equalize and sink_ratio); the fixed gain (fixed)",
                              label="The largest gain", minimum=1, maximum=20, step=0.5)
    mask_threshold: float | None = setting(None, "threshold of the per-part masks on min-max maps (default: "
                                                 "Otsu's, the paper's)", label="The mask threshold", above=0,
                                           maximum=1, step=0.05)


INSTRUCT = InstructSettings()
