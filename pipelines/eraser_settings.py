"""Remove object's settings with the paper's defaults: the one place they live (see pipelines/eraser.py).

Kept apart from the pipeline so that the command line can build its flags and show the defaults
in `--help` without importing torch and diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .errors import UserInputError
from .settings import Settings, setting

MODES = ("sip", "dip")
CROP_MODES = ("auto", "always", "never")
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_IMAGES = 8
MAX_GROW = 256
MAX_BLUR_KERNEL = 301
MAX_WORKING_SIDE = 4096


@dataclass(frozen=True)
class EraserSettings(Settings):
    """Remove object's settings, with the paper's defaults (docs/methods/eraser.md): the one place
    they live; the CLI flags and the tab's controls are made from these fields.  A model folder
    may replace some for that model (`EraserSettings.for_model(model)`, `task_defaults.json`:
    the built-in model's measured ones)."""

    mode: str = setting("sip", "latent process: sip re-pastes the noised background, dip inverts the image",
                        label="Mode", choices=MODES)
    steps: int = setting(50, "DDIM steps", label="Steps", minimum=1, maximum=MAX_STEPS, step=1)
    strength: float | None = setting(None, "how far into the noise to start (default: 0.8 for SIP, 1.0 for DIP)",
                                     label="Strength", above=0, maximum=1, step=0.05)
    guidance: float = setting(9.0, "removal guidance (SARG) scale s", label="The removal guidance scale",
                              minimum=0, maximum=MAX_GUIDANCE, step=0.5)
    ss_steps: int = setting(9, "similarity suppression on steps 0..N (-1: off)", label="SS steps",
                            minimum=-1, maximum=MAX_STEPS, step=1)
    ss_scale: float = setting(0.3, "similarity suppression scale (lambda)", label="The SS scale",
                              above=0, maximum=1, step=0.05)
    num_images: int = setting(1, "results per image, with seeds seed, seed+1, ...", label="The number of images",
                              minimum=1, maximum=MAX_IMAGES, step=1)
    grow: int = setting(0, "grow (+) or shrink (-) the mask by this many pixels first", label="Mask growth",
                        minimum=-MAX_GROW, maximum=MAX_GROW, step=1)
    crop: str = setting("auto", "process only a region around the mask of large photos", label="Crop",
                        choices=CROP_MODES)
    blur_kernel: int | None = setting(None, "mask dilation kernel at working size, odd (default: the paper's, "
                                            "scaled to the side)", label="The mask blur kernel", minimum=1,
                                      maximum=MAX_BLUR_KERNEL)
    working_side: int | None = setting(None, "working resolution (default: the model's native side)",
                                       label="The working side", minimum=8, maximum=MAX_WORKING_SIDE)
    composite: bool = setting(True, "paste the result into the input through the feathered mask, so pixels "
                                    "away from it stay exact", label="Composite")
    freeu: bool | None = setting(None, "FreeU (default: on for SD 2.x as in the paper, off otherwise)", label="FreeU")
    aas: bool = setting(True, "attention redirection in the decoder self-attention (off: the same loop "
                                    "without it, an ablation)", label="AAS")
    fill_prompt: str = setting("", "a prompt for what fills the hole, e.g. 'an empty background' (ours; the paper "
                                   "uses none)", label="Fill with")

    TASK: ClassVar[str] = "eraser"  # a model folder's own defaults (`for_model`; the built-in model's)

    #: SIP's strength; DIP starts from full noise (1.0)
    SIP_STRENGTH: ClassVar[float] = 0.8

    def resolved_strength(self) -> float:
        if self.strength is not None:
            return float(self.strength)
        return 1.0 if self.mode == "dip" else self.SIP_STRENGTH

    def resolved_freeu(self, is_sd2: bool) -> bool:
        """FreeU on or off: as set, else on for SD 2.x (the paper's backbone and values) only."""
        return is_sd2 if self.freeu is None else bool(self.freeu)

    def check(self) -> None:
        if int(self.steps * self.resolved_strength()) < 1:
            raise UserInputError(
                f"With {self.steps} steps at strength {self.resolved_strength():g} no step would run; "
                "raise the steps or the strength."
            )


PAPER = EraserSettings()
