"""Edit video: ReAtCo (re-attentional diffusion + invariant-region joint sampling) on a
Tune-A-Video-inflated SD 1.x/2.x UNet (`builtin` included), or, beyond the paper, on AnimateDiff
(the same UNet with a diffusers MotionAdapter's motion modules: `motion_adapter=`; no per-video
fine-tune by default).

    from pipelines.models import load
    from pipelines.video import edit_video

    result = edit_video(load("builtin"), "clip.mp4", "a red circle on a striped background",
                        "a blue square on a striped background", ["square:8,8,40,40"], frames=8)
    result.frames, result.heatmaps["square"], result.save("edited.mp4")

Modules: `inflate` (the inflated video UNet and `video_call`, the frame-call of both video
UNets), `motion` (the AnimateDiff UNet, adapters and their checks), `tune` (per-video fine-tune,
cached and resumable), `reatco` (windows, inversion, RAD and IRJS), `boxes` (boxes bound to words),
`clip` (reading and writing clips), `edit` (the task function and its result).  The method,
its defaults and our deviations: docs/methods/video.md; the settings: pipelines/video_settings.py.

Deviations from the reference code (every one is ours on purpose):
- the inflated UNet is a deep copy of the shared model (never the cached model changed), and
  the temporal attention's output bias is zeroed as well as its weight, so the inflated UNet
  equals the frame-wise one exactly at initialisation;
- RAD averages every capture layer (the reference averages 3 or 5 depending on call parity);
  its capture layers are the deepest non-mid cross-attention level of any UNet (SD 1.x: the
  paper's 1/32 layers; builtin and the tiny models: latent/2, 3 layers);
- the gradient pass runs only on steps that use it (i < 25 of 50, refinements at 0/10/20), stops
  after the block holding the last capture layer, and the refinement's last loss serves the main
  update (the reference recomputes it); no discarded guidance forwards in the refinement loop;
- top-k takes at least one cell and a box always covers at least one cell (the reference gives
  NaN on tiny boxes); a one-frame window or one-cell grid axis is smoothed with replicate padding
  (reflect needs two);
- IRJS noise is seeded (the reference uses unseeded randn_like) and drawn once per step for the
  whole clip, so overlapping windows see the same noise;
- words are bound by name through the tokenizer's offsets (a multi-token word: the max of its
  sub-token maps; a repeated word: all its occurrences); per-frame boxes (keyframes, linear
  interpolation) are our extension of the paper's static boxes;
- AnimateDiff is our extension (pipelines/video/motion.py, docs/methods/video.md "AnimateDiff,
  beyond the paper"): per-frame spatial self-attention (no sparse-causal layers), no fine-tune
  unless asked for (then the spatial q projections and the motion modules' attention), the
  adapter's fingerprint in the fine-tune and inversion keys;
- inversion and the fine-tune run over the same temporal windows as sampling (inversion) or on a
  random run of `tune_frames` frames (fine-tune; default the whole clip up to the paper's 16), so memory
  is bounded by the window; at other step counts than 50 the RAD schedule scales (main update on
  the first `rad_until` of the steps, refinement indices i * steps // 50).
"""

from .boxes import Box, Target, parse_box
from .clip import Clip, read_clip, write_clip
from .edit import SUPPORTED, VideoEditResult, default_cache_dir, edit_video
from .inflate import FrameJointGroupNorm, inflate, video_call
from .motion import load_adapter, motion_unet
from .reatco import capture_layers, windowed, windows

__all__ = ["Box", "Clip", "FrameJointGroupNorm", "SUPPORTED", "Target", "VideoEditResult", "capture_layers",
           "default_cache_dir", "edit_video", "inflate", "load_adapter", "motion_unet", "parse_box", "read_clip",
           "video_call", "windowed", "windows", "write_clip"]
