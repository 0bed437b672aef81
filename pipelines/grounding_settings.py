"""Segment by text's settings: every RefAM parameter with its default, the one place they live
(see pipelines/grounding.py); the CLI flags and the tab's controls are made from these fields.

Kept apart from the pipeline so that the command line can build its flags and show the defaults
in `--help` without importing torch and diffusers.  The choices below are those of
attention_processors/refam.py (which imports torch); tests/test_grounding_settings.py checks
that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .errors import UserInputError
from .seeds import MAX_SEED
from .settings import Settings, Spec, setting

DEPTHS = ("first", "middle", "last", "middle+last", "all")  # refam.DEPTH_RANGES
BLOCKS = ("dual", "single", "both")  # refam.BLOCK_FAMILIES
NORMS = ("text_softmax", "full_row", "raw")  # refam.NORMS
GAS_MODES = ("none", "exclude", "suppress", "redirect")  # refam.GAS_MODES
TARGETS = ("content", "head")
T5_LENGTHS = ("native", "trimmed")
TEXT_PARTS = ("t5", "clip", "both")
SAM2_SELECTIONS = ("sam_score", "heatmap_iou", "product")
MAGNET_WORDS = ("and", "of", "the", "a", "with", "on", "in", "to")  # ours (docs/methods/grounding.md), in order
MAX_SIGMA = 0.99  # sigma 1 is pure noise: nothing of the image is left to ground
MAX_TIMESTEP = 999
MAX_GUIDANCE = 30.0
MAX_AUX = 32
MAX_REFINE_STEPS = 16
MAX_NOISE_DRAWS = 16
MIN_SIZE, MAX_SIZE = 64, 2048
PAPER_SIZE = 1024  # the working long side on FLUX and SD3 (the paper's); UNets use their own size
MAX_SAM2_POINTS = 16
MAX_FRAMES = 600  # video frames read at most (segment_video's max_frames, the CLI's --max-frames)
OTSU = "otsu"


@dataclass(frozen=True)
class GroundingSettings(Settings):
    """Every RefAM parameter with its default (ours unless marked; docs/methods/grounding.md): the one place
    they live; the CLI flags and the tab's controls are made from these fields.  A model folder
    may replace some for that model (`GroundingSettings.for_model(model)`, `task_defaults.json`:
    the built-in model's measured ones)."""

    TASK: ClassVar[str] = "grounding"

    depth: str = setting("middle+last", "DiT layers read: the first, middle or last third, middle+last, or all",
                         label="Depth", choices=DEPTHS)
    blocks: str = setting("both", "FLUX block family read: dual-stream, single-stream or both", label="Blocks",
                          choices=BLOCKS)
    # None: the levels with 16-48 token grids (SD 1.5 at 512 px: levels 1 and 2, the 32x32 and
    # 16x16 grids, the paper's; our 64 px model: level 0, its 16x16 grid)
    unet_levels: tuple[int, ...] | None = setting(
        None, "UNet cross-attention levels read, e.g. 1,2 (default: those with 16-48 token grids; SD 1.5 at "
              "512 px: 1,2, the paper's 32x32 and 16x16 grids)", label="UNet levels")
    sigma: float = setting(0.3, "DiT noise level (FLUX, SD3)", label="The noise level sigma", above=0,
                           maximum=MAX_SIGMA, step=0.05)
    timestep: int = setting(300, "UNet noise timestep", label="The UNet timestep", minimum=0,
                            maximum=MAX_TIMESTEP, step=1)
    guidance: float = setting(3.5, "FLUX-dev guidance embedding", label="FLUX guidance", minimum=0,
                              maximum=MAX_GUIDANCE, step=0.5)
    norm: str = setting("text_softmax", "attention read: softmax over the text keys, the joint row's "
                                        "probabilities (full_row) or logits (raw, an ablation)",
                        label="Normalisation", choices=NORMS)
    magnets: int = setting(4, f"attention magnets: stop words appended to the expression, 0 to {len(MAGNET_WORDS)}",
                           label="Magnet words", minimum=0, maximum=len(MAGNET_WORDS), step=1)
    colour: bool = setting(True, "append one colour word (a magnet)", label="Colour word")
    filter_magnets: bool = setting(True, "drop magnet and stop-word columns before aggregation",
                                   label="Filter magnets")
    gas: str = setting("exclude", "global attention sinks: none (ignored), exclude (dropped from the mean), "
                                  "suppress or redirect (biased away in a second pass)",
                       label="The GAS mode", choices=GAS_MODES)
    l_gas: float = setting(0.5, "sinks are looked for at layer depth >= this fraction", label="The GAS depth",
                           minimum=0, maximum=1, step=0.05)
    tau_mass: float = setting(4.0, "a sink's mean attention is at least this many times the median column's",
                              label="The sink mass ratio", minimum=0, step=0.5)
    tau_cv: float = setting(0.5, "a sink's spatial coefficient of variation is at most this",
                            label="The sink variation limit", minimum=0, step=0.05)
    n_aux: int = setting(4, "\".\" tokens appended in redirect mode", label="Aux tokens", minimum=0, maximum=MAX_AUX)
    target: str = setting("content", "columns averaged: every content word, or the head noun only "
                                     "(\"the man in red\" -> man)", label="Target", choices=TARGETS)
    t5_length: str = setting("native", "T5 text length: native (512 FLUX-dev, 256 SD3) or trimmed to the prompt",
                             label="T5 length", choices=T5_LENGTHS)
    text_part: str = setting("t5", "SD3 text keys read: t5, clip or both", label="The SD3 text part",
                             choices=TEXT_PARTS)
    # Rows renormalised over the word columns before the target mean (refam.layer_heat).
    # None: per backbone, on for FLUX and SD3 (the paper's family, where magnets compete for the
    # word mass), off for UNets: on `builtin`, 50 grounding scenes of benchmarks/quality.py,
    # mIoU 0.020 with it vs 0.189 [0.117, 0.262] without, and the heatmap is hotter outside the
    # target than inside (-0.18 vs +0.24) (builtin v1).  On builtin v2 (words told apart): 0.239
    # with it vs 0.282 without, +1.3 spreads.  No other UNet with real weights could be measured.
    renorm: bool | None = setting(None, "renormalise rows over the word columns (default: on for FLUX and SD3, "
                                        "off for UNets, where it inverted the heatmap on builtin v1: mIoU 0.020 "
                                        "vs 0.189 without)", label="Renormalisation")
    smooth: bool = setting(True, "Gaussian smoothing of the heatmap, sigma = 1 token cell", label="Smoothing")
    threshold: str | float = setting(OTSU, "mask threshold: otsu, or a fixed number between 0 and 1",
                                     label="The threshold")
    component: bool = setting(True, "keep only the connected component containing the heatmap's peak",
                              label="Peak component")
    refine: bool = setting(False, "refine the heatmap by self-attention propagation (SD UNets only)",
                           label="Refine")
    refine_steps: int = setting(1, "self-attention propagation steps of --refine", label="Refine steps",
                                minimum=1, maximum=MAX_REFINE_STEPS)
    n_noise: int = setting(1, "noise draws averaged", label="Noise draws", minimum=1, maximum=MAX_NOISE_DRAWS)
    size: int | None = setting(None, f"working long side in pixels (default: {PAPER_SIZE} FLUX/SD3, the model's "
                                     "own size for UNets: 512 SD 1.5)", label="The working size", minimum=MIN_SIZE,
                               maximum=MAX_SIZE, step=16)
    early_exit: bool = setting(True, "stop the forward after the last layer read (the maps are the same)",
                               label="Early exit")
    seed: int = setting(0, "noise seed", label="The seed", minimum=0, maximum=MAX_SEED)
    sam2: str | None = setting(None, "a local SAM2 model folder or cached id (transformers format) prompted with "
                                     "the heatmap's points (default: off, the thresholded heatmap)", label="SAM2")
    sam2_selection: str = setting("sam_score", "which of SAM2's masks: its own score, IoU with the heatmap, "
                                               "or their product", label="The SAM2 selection",
                                  choices=SAM2_SELECTIONS)
    sam2_points: int = setting(1, "SAM2 positive points: the argmax, or the top-k peaks after NMS",
                               label="SAM2 points", minimum=1, maximum=MAX_SAM2_POINTS)
    sam2_negatives: int = setting(0, "SAM2 negative points at the lowest-heat locations",
                                  label="SAM2 negative points", minimum=0, maximum=MAX_SAM2_POINTS)
    temporal_window: int = setting(3, "video: centred moving average of the heatmaps over this many frames",
                                   label="The temporal window", minimum=1)
    batch_frames: int = setting(4, "video frames per forward", label="The frame batch", minimum=1)

    def _checked(self, name: str, value, spec: Spec, kind: type):
        """The base checks, plus the two fields that are not one number or word."""
        if name == "threshold":
            return self._threshold(value)
        if name == "unet_levels":
            return self._levels(value)
        return super()._checked(name, value, spec, kind)

    def _threshold(self, value):
        """"otsu" or a number in (0, 1); a number given as text (the CLI) becomes a float."""
        if isinstance(value, str) and value.strip().lower() == OTSU:
            return OTSU
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if isinstance(value, bool) or number is None or not 0 < number < 1:
            raise UserInputError(f"The threshold must be 'otsu' or a number between 0 and 1, not {value!r}.")
        return number

    def _levels(self, value):
        """None, or a non-empty tuple of whole numbers >= 0 (from a sequence or text such as "1,2")."""
        if value is None:
            return None
        items = value.replace(",", " ").split() if isinstance(value, str) else value
        try:
            numbers = [float(v) for v in items if not isinstance(v, bool)]
            ok = 0 < len(numbers) == len(items) and all(n >= 0 and n == int(n) for n in numbers)
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise UserInputError(f"UNet levels must be whole numbers of 0 or more, such as 1,2, not {value!r}.")
        return tuple(int(n) for n in numbers)

DEFAULTS = GroundingSettings()
