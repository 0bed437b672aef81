"""Every RefAM parameter with its default, in one place (see pipelines/grounding.py).

Kept apart from the pipeline so that the command line can show the defaults in `--help`
without importing torch and diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroundingSettings:
    """Every RefAM parameter with its default (ours unless marked; spec section 4)."""

    depth: str = "middle+last"  # DiT layers: first / middle / last third, middle+last, all
    blocks: str = "both"  # FLUX block family: dual, single, both
    # UNet attn2 levels; None: those with 16-48 token grids (SD 1.5 at 512 px: levels 1 and 2,
    # the 32x32 and 16x16 grids, the paper's; our 64 px model: level 0, its 16x16 grid)
    unet_levels: tuple[int, ...] | None = None
    sigma: float = 0.3  # DiT noise level
    timestep: int = 300  # UNet noise timestep
    guidance: float = 3.5  # FLUX-dev guidance embedding
    norm: str = "text_softmax"  # text_softmax, full_row, raw
    magnets: int = 4  # appended stop words k (0 = none)
    colour: bool = True  # append one colour word
    filter_magnets: bool = True  # drop magnet and stop-word columns before aggregation
    gas: str = "exclude"  # none, exclude, suppress, redirect
    l_gas: float = 0.5  # sinks are looked for at depth >= l_gas
    tau_mass: float = 4.0
    tau_cv: float = 0.5
    n_aux: int = 4  # "." tokens appended in redirect mode
    target: str = "content"  # content, head
    t5_length: str = "native"  # native (512 FLUX-dev / 256 SD3) or trimmed to the prompt
    text_part: str = "t5"  # SD3: t5, clip, both
    # Rows renormalised over the word columns before the target mean (refam.layer_heat).
    # None: per backbone, on for FLUX and SD3 (the paper's family, where magnets compete for the
    # word mass), off for UNets: on `builtin`, 50 grounding scenes of benchmarks/quality.py,
    # mIoU 0.020 with it vs 0.189 [0.117, 0.262] without, and the heatmap is hotter outside the
    # target than inside (-0.18 vs +0.24).  No other UNet with real weights could be measured.
    renorm: bool | None = None
    smooth: bool = True  # Gaussian, sigma = 1 token cell
    threshold: str | float = "otsu"  # "otsu" or a number in (0, 1)
    component: bool = True  # keep the connected component containing the argmax
    refine: bool = False  # UNet only: propagate the heatmap by self-attention
    refine_steps: int = 1
    n_noise: int = 1  # noise draws averaged
    size: int | None = None  # working long side; None: 1024 (FLUX, SD3) or the UNet's own size (SD 1.5: 512)
    early_exit: bool = True
    seed: int = 0
    sam2: str | None = None  # local SAM2 folder / cached id; None: Otsu mask
    sam2_selection: str = "sam_score"  # sam_score, heatmap_iou, product
    sam2_points: int = 1  # positive points: the argmax, or the top-k peaks after NMS
    sam2_negatives: int = 0  # negative points at the lowest-heat locations
    temporal_window: int = 3  # video: centred moving average over this many frames
    batch_frames: int = 4  # video: frames per forward
