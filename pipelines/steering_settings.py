"""Counterfactual steering's settings with MedSteer's defaults: the one place they live (see
pipelines/steering.py).  Kept apart from the pipeline so the command line builds its flags
without importing torch.

Two steps, two dataclasses: `DirectionSettings` (estimating the directions of a prompt pair) and
`PairSettings` (generating a plain and a steered image; what it leaves as None is taken from
the directions file, so a pair is made as its directions were estimated).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserInputError
from .seeds import MAX_SEED
from .settings import Settings, setting

#: the paper's prompt pair (Kvasir): the concept to remove, the concept to steer towards
PAPER_POSITIVE = "An endoscopic image of dyed lifted polyps"
PAPER_NEGATIVE = "An endoscopic image of normal cecum"
#: the paper's classifier-free guidance on its backbone (PixArt-alpha 512)
PAPER_GUIDANCE = 4.5
SD_GUIDANCE = 7.5  # our choice for SD UNets without a default of their own
MAX_SAMPLES = 10_000
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_BETA = 10.0
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_BATCH = 64
STEER_CHOICES = ("both", "cond")
STEP_MAPS = ("clamp", "relative")


@dataclass(frozen=True)
class DirectionSettings(Settings):
    """How directions are estimated: the paper's 20 steps, different seeds for the two prompts."""

    samples: int = setting(100, "images per prompt (ours; the paper's README suggests 200 in all)",
                           label="Samples per prompt", minimum=1, maximum=MAX_SAMPLES, step=1)
    steps: int = setting(20, "denoising steps", label="Steps", minimum=2, maximum=MAX_STEPS, step=1)
    guidance: float | None = setting(None, f"CFG scale (default: {PAPER_GUIDANCE:g} on PixArt, the paper's; "
                                           "the model's own on SD)", label="Guidance", minimum=0,
                                     maximum=MAX_GUIDANCE, step=0.5)
    negative_prompt: str = setting("", "CFG negative prompt", label="The CFG negative prompt",
                                   flag="--cfg-negative-prompt")
    height: int | None = setting(None, "image height (default: the model's size)", label="Height",
                                 minimum=MIN_SIDE, maximum=MAX_SIDE)
    width: int | None = setting(None, "image width (default: the model's size)", label="Width",
                                minimum=MIN_SIDE, maximum=MAX_SIDE)
    base_seed: int = setting(0, "first seed", label="The base seed", minimum=0, maximum=MAX_SEED)
    layers: str | None = setting(None, "only the cross-attention layers whose name matches this regular "
                                       "expression (default: all)", label="The layer pattern")
    matched: bool = setting(False, "use the same seeds for both prompts (default: different seeds, as the paper)",
                            label="Matched seeds")
    batch_size: int = setting(4, "images per model call", label="The batch size", minimum=1, maximum=MAX_BATCH)

    def check(self) -> None:
        last = self.base_seed + 2 * self.samples
        if last > MAX_SEED:
            raise UserInputError(f"Seeds must be between 0 and {MAX_SEED}, not {last} (base seed + 2 x samples).")


@dataclass(frozen=True)
class PairSettings(Settings):
    """How a pair is made: the paper's beta 2 on both CFG halves; None fields come from the directions."""

    beta: float = setting(2.0, "steering strength: 1 removes the concept, 2 reflects it (1-3 is the useful range)",
                          label="Beta", minimum=0, maximum=MAX_BETA, step=0.1)
    steps: int | None = setting(None, "denoising steps (default: the directions')", label="Steps", minimum=2,
                                maximum=MAX_STEPS)
    guidance: float | None = setting(None, "CFG scale (default: the directions')", label="Guidance", minimum=0,
                                     maximum=MAX_GUIDANCE)
    negative_prompt: str | None = setting(None, "CFG negative prompt (default: the directions' one)",
                                          label="The CFG negative prompt", flag="--cfg-negative-prompt")
    height: int | None = setting(None, "image height (default: the directions' size)", label="Height",
                                 minimum=MIN_SIDE, maximum=MAX_SIDE)
    width: int | None = setting(None, "image width (default: the directions' size)", label="Width",
                                minimum=MIN_SIDE, maximum=MAX_SIDE)
    steer: str = setting("both", "CFG halves to steer: both (the paper's) or cond", label="Steer",
                         choices=STEER_CHOICES)
    step_map: str = setting("clamp", "clamp: step t uses direction min(t, T-1) (the paper's); relative: rescale",
                            label="The step map", choices=STEP_MAPS)
    batched: bool = setting(True, "run the plain and the steered image in one batch", label="Batched",
                            flag="--separate")
    allow_other_model: bool = setting(False, "accept directions estimated on another model of the same architecture",
                                      label="Allow another model")


DIRECTIONS = DirectionSettings()
PAIR = PairSettings()
