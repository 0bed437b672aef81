"""Instruction edit's settings (SaaS, self-adaptive attention scaling): the one place their
defaults live (see pipelines/instruct.py and docs/methods/instruction.md).

Kept apart from the pipeline so that the command line can build its flags and show the
defaults in `--help` without importing torch and diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from .settings import Settings, setting

#: "auto": the model's rule, `gain_rule()`; the others as `attention_processors.saas.compute_gains`
GAIN_MODES = ("auto", "equalize", "fixed", "sink_ratio", "paper")
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
#: most sub-instructions one instruction may have (the model's 77-token window ends them sooner)
MAX_PARTS = 8


@dataclass(frozen=True)
class InstructSettings(Settings):
    """Instruction edit's settings.  SaaS's own (window, scale, Otsu masks) are the paper's; so
    is the gain rule on OmniGen, the paper's backbone ("auto": the input image's tokens are the
    competitor, unclipped).  On SD-family models, where the image enters by channel concatenation
    and has no attention tokens to compete with, "auto" is our `equalize` rule, capped at
    `max_gain` (docs/methods/instruction.md).  None for steps and guidance: the model's (OmniGen:
    the paper's 50 steps, 2.5 and 1.6)."""

    steps: int | None = setting(None, "denoising steps (default: the model's; builtin-edit 25, OmniGen 50)",
                                label="Steps", minimum=2, maximum=MAX_STEPS, step=1)
    guidance: float | None = setting(None, "instruction (text) guidance scale (default: the model's; 7.5, OmniGen "
                                           "2.5)", label="The instruction guidance", minimum=1, maximum=MAX_GUIDANCE,
                                     step=0.5)
    image_guidance: float | None = setting(None, "image guidance scale: how closely to keep the source (default: "
                                                 "the model's; 1.5, OmniGen 1.6; FLUX Kontext has none)",
                                           label="The image guidance", minimum=1, maximum=MAX_GUIDANCE, step=0.1)
    saas: bool = setting(True, "self-adaptive attention scaling (off: plain sampling, the baseline)", label="SaaS")
    window: float = setting(0.4, "fraction of the steps SaaS measures and rescales in (paper: 20 of 50)",
                            label="The SaaS window", above=0, maximum=1, step=0.05)
    scale: float = setting(1.0, "extra factor on every gain (paper: 1.0)", label="The gain scale", above=0,
                           maximum=10, step=0.1)
    gain: str = setting("auto", "gain rule: auto (the model's: paper on OmniGen and FLUX Kontext, equalize "
                                "otherwise), equalize the parts' attention (ours), a fixed gain, the competitor's "
                                "share over the part's capped at the largest gain (sink_ratio), or uncapped (paper); "
                                "the competitor is the input image's tokens on OmniGen, the reference image's on "
                                "FLUX Kontext, the start token on SD",
                        label="The gain rule", choices=GAIN_MODES)
    max_gain: float = setting(3.0, "largest gain (equalize and sink_ratio); the fixed gain (fixed); the paper's rule "
                                   "has no cap", label="The largest gain", minimum=1, maximum=20, step=0.5)
    mask_threshold: float | None = setting(None, "threshold of the per-part masks on min-max maps (default: "
                                                 "Otsu's, the paper's)", label="The mask threshold", above=0,
                                           maximum=1, step=0.05)


INSTRUCT = InstructSettings()


def gain_rule(settings: InstructSettings, image_tokens: bool) -> str:
    """The gain rule `settings` asks for, with "auto" resolved: the paper's ("paper") where the
    input image is attention tokens (`image_tokens`: OmniGen; FLUX Kontext's reference image, our
    extrapolation), else our "equalize"."""
    if settings.gain != "auto":
        return settings.gain
    return "paper" if image_tokens else "equalize"
