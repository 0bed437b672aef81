"""Edit video's settings (ReAtCo) with the paper's defaults: the one place they live (see
pipelines/video/ and docs/methods/video.md).

Kept apart from the pipeline so that the command line can build its flags and show the
defaults in `--help` without importing torch and diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .errors import UserInputError
from .settings import Settings, setting

MAX_FRAMES = 1024
MAX_STEPS = 200
MAX_TUNE_STEPS = 5000
MAX_SIDE = 2048
MIN_SIDE = 32
PRECISIONS = ("auto", "no", "fp16", "bf16")


@dataclass(frozen=True)
class VideoSettings(Settings):
    """ReAtCo's settings, the paper's (released configs) by default; the CLI flags (and a tab's
    controls) are made from these fields."""

    frames: int = setting(16, "edit this many frames from the start of the clip (paper: 16; 0: every frame)",
                          label="The number of frames", minimum=0, maximum=MAX_FRAMES)
    frame_stride: int = setting(1, "take every n-th frame of the source", label="The frame stride", minimum=1,
                                maximum=64)
    height: int | None = setting(None, "working height in pixels (default: the source's, rounded down to the "
                                       "model's multiple; paper 448)", label="Height", minimum=MIN_SIDE,
                                 maximum=MAX_SIDE)
    width: int | None = setting(None, "working width in pixels (default: the source's, rounded down to the "
                                      "model's multiple; paper 768)", label="Width", minimum=MIN_SIDE,
                                maximum=MAX_SIDE)
    window: int = setting(4, "frames per temporal window; overlapping windows are averaged (paper: 4)",
                          label="The window", minimum=1, maximum=MAX_FRAMES)
    window_stride: int = setting(1, "frames between the starts of two windows (paper: 1)", label="The window stride",
                                 minimum=1, maximum=MAX_FRAMES)
    steps: int = setting(50, "DDIM sampling and inversion steps", label="Steps", minimum=2, maximum=MAX_STEPS)
    guidance: float = setting(12.5, "classifier-free guidance scale", label="Guidance", minimum=1, maximum=50,
                              step=0.5)
    seed: int = setting(33, "random seed (VAE sampling, fine-tune, IRJS noise)", label="The seed", minimum=0,
                        maximum=2**32 - 1)
    # ---------------------------------------------------------------- the video backbone (ours: AnimateDiff)
    motion_adapter: str | None = setting(None, "a diffusers MotionAdapter (a local folder, or a hub id): AnimateDiff's "
                                               "motion modules instead of the Tune-A-Video inflation (beyond the "
                                               "paper; no fine-tune by default)", label="The motion adapter")
    # ---------------------------------------------------------------- per-video fine-tune
    tune_steps: int | None = setting(None, "per-video fine-tune steps (default: the paper's 200 on the inflated UNet, "
                                           "0 with a motion adapter, which needs none; 0: no fine-tune)",
                                     label="Fine-tune steps", minimum=0, maximum=MAX_TUNE_STEPS)
    tune_lr: float = setting(3e-5, "fine-tune learning rate", label="The fine-tune learning rate", above=0,
                             maximum=1e-2)
    tune_frames: int | None = setting(None, "frames per fine-tune step, a random run of the clip (default: the "
                                            "whole clip up to 16 frames, the paper's clip; a longer clip trains "
                                            "on random 16-frame runs, so memory does not grow with the clip)",
                                      label="Fine-tune frames", minimum=1, maximum=MAX_FRAMES)
    mixed_precision: str = setting("auto", "fine-tune precision (auto: fp16 on CUDA as in the paper, none on CPU)",
                                   label="Mixed precision", choices=PRECISIONS)
    gradient_checkpointing: bool = setting(True, "gradient checkpointing in the fine-tune and RAD's gradient pass",
                                           label="Gradient checkpointing")
    checkpoint_every: int = setting(50, "write a resumable fine-tune checkpoint every n steps",
                                    label="The checkpoint interval", minimum=1, maximum=MAX_TUNE_STEPS)
    per_frame_groupnorm: bool = setting(False, "per-frame GroupNorm in the ResNets instead of Tune-A-Video's "
                                               "frame-joint statistics", label="Per-frame GroupNorm")
    # ---------------------------------------------------------------- RAD and IRJS
    rad: bool = setting(True, "re-attentional diffusion: box losses move each word's attention into its box",
                        label="RAD")
    rad_scale: float = setting(20.0, "RAD step size alpha_0 (alpha_i = scale * sqrt(linspace(1, 0.5)))",
                               label="The RAD scale", minimum=0, maximum=1000)
    rad_until: float = setting(0.5, "fraction of the steps with RAD's main update (paper: 25 of 50)",
                               label="The RAD fraction", minimum=0, maximum=1)
    refine_iterations: int = setting(20, "most refinement iterations at the refinement steps",
                                     label="Refinement iterations", minimum=0, maximum=100)
    topk: float = setting(0.2, "fraction of the cells averaged inside and outside each box", label="Top-k",
                          above=0, maximum=1)
    temperature: float = setting(100.0, "probability scale before the token re-softmax", label="The temperature",
                                 above=0, maximum=10000)
    smoothing: float = setting(0.5, "sigma of the 3-D Gaussian over frames and cells", label="The smoothing",
                               above=0, maximum=10)
    preserve_background: bool = setting(True, "IRJS: outside the boxes the model sees the re-noised source, so "
                                              "the rest of the clip stays (off for background edits)",
                                        label="IRJS")
    heatmaps: bool = setting(True, "record each bound word's attention for a heatmap video",
                             label="Heatmaps")

    #: refinement steps at 50 steps and their thresholds theta (paper); other step counts scale the index
    REFINE: ClassVar[tuple[tuple[int, float], ...]] = ((0, 0.05), (10, 0.5), (20, 0.8))
    PAPER_STEPS: ClassVar[int] = 50
    #: the paper's fine-tune of the inflated UNet (Tune-A-Video's per-video fine-tune, as ReAtCo runs it)
    PAPER_TUNE_STEPS: ClassVar[int] = 200
    #: the paper's clip length: the default fine-tune run of a longer clip
    PAPER_TUNE_FRAMES: ClassVar[int] = 16
    #: the end of the step-size schedule s = linspace(1, RAD_END, steps)
    RAD_END: ClassVar[float] = 0.5

    def check(self) -> None:
        if self.motion_adapter is not None and not self.motion_adapter.strip():
            raise UserInputError("The motion adapter is empty; name a folder of a diffusers MotionAdapter, or leave it "
                                 "out for the Tune-A-Video inflation.")
        if self.frames == 1:
            raise UserInputError("A video edit needs at least 2 frames; set the number of frames to 2 or more "
                                 "(0: every frame).")
        if self.tune_frames is not None and self.frames and self.tune_frames > self.frames:
            raise UserInputError(f"Fine-tune frames ({self.tune_frames}) cannot exceed the number of frames "
                                 f"({self.frames}).")

    def refine_thresholds(self) -> dict[int, float]:
        """{step index: theta} of the refinement steps at this step count."""
        out: dict[int, float] = {}
        for index, theta in self.REFINE:
            out.setdefault(min(self.steps - 1, index * self.steps // self.PAPER_STEPS), theta)
        return out

    def fine_tune_steps(self) -> int:
        """The fine-tune steps this run does: `tune_steps` when given, else the paper's 200 on the
        inflated UNet (whose temporal attention starts at zero and is learnt per video) and 0 with
        a motion adapter (AnimateDiff's motion modules are trained already)."""
        if self.tune_steps is not None:
            return self.tune_steps
        return 0 if self.motion_adapter is not None else self.PAPER_TUNE_STEPS

    def tune_run(self, frames: int) -> int:
        """Frames per fine-tune step on a clip of `frames` frames."""
        return min(frames, self.tune_frames or self.PAPER_TUNE_FRAMES)

    def rad_last_step(self) -> int:
        """Main RAD updates happen on steps i < this."""
        return int(round(self.rad_until * self.steps))


PAPER = VideoSettings()
