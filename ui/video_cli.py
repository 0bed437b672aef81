"""`python app.py edit-video ...`: edit a clip with ReAtCo (boxes bound to words of the prompt).

    python app.py edit-video --video clip.mp4 --source-prompt "a red circle on a striped background" \
        --prompt "a blue square on a striped background" --box square:8,8,40,40 --output edited.mp4
    python app.py edit-video ... --box square:8,8,40,40@0 --box square:20,8,52,40@7   # a moving box
    python app.py edit-video ... --motion-adapter path/to/animatediff-motion-adapter   # AnimateDiff

Writes OUT.mp4 (the source's frame rate, and its audio when it has some), OUT_side_by_side.mp4,
one OUT_attn_<i>_<word>.mp4 heatmap video per bound word and OUT.json (every setting, the boxes,
the timings).  Every setting of pipelines/video_settings.py is a flag (`--help` shows the paper's
defaults).  The per-video fine-tune and the inversion are cached in --cache-dir, so editing the
same clip again (other boxes, another prompt) skips them, and an interrupted fine-tune resumes.
`--motion-adapter DIR` runs the edit on AnimateDiff (the model's UNet with a diffusers
MotionAdapter's motion modules; beyond the paper, pipelines/video/motion.py) instead of the
Tune-A-Video inflation, with no fine-tune unless --tune-steps asks for one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.errors import UserInputError
from pipelines.video_settings import VideoSettings
from ui.cli_common import Command, add_model_args
from ui.cli_settings import add_settings_arguments, settings_from_args


def add_edit_video_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", type=Path, required=True,
                        help="the clip: .mp4, .webm, .gif, .mov, .avi, .mkv, or a folder of frames")
    parser.add_argument("--source-prompt", required=True, help="what the clip shows (used for the fine-tune)")
    parser.add_argument("--prompt", required=True, help="the edited clip's prompt")
    parser.add_argument("--box", action="append", default=[], metavar="WORD:x1,y1,x2,y2[@FRAME]",
                        help="a box in source-frame pixels bound to a word of --prompt (repeatable; several "
                             "@FRAME keyframes of one word are interpolated)")
    parser.add_argument("--output", type=Path, required=True, help="the edited .mp4")
    parser.add_argument("--fps", type=float, default=None,
                        help="frame rate of a folder of frames (default: the video's own, 8 for a folder)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where fine-tunes and inversions are cached (default: ~/.cache/attention-editing/video)")
    parser.add_argument("--motion-adapter", dest="motion_adapter", default=None, metavar="DIR",
                        help=VideoSettings.specs()["motion_adapter"][1].help.replace("a local folder", "a local folder "
                             "with config.json and diffusion_pytorch_model.safetensors"))
    add_settings_arguments(parser, VideoSettings, skip=("motion_adapter",))
    add_model_args(parser)


def _progress(stage: str, done: int, total: int, loss) -> None:
    tail = "" if loss is None else f" (loss {loss:.4f})"
    print(f"{stage}: {done}/{total}{tail}", file=sys.stderr, flush=True)


def run_edit_video(args: argparse.Namespace) -> int:
    import math

    if args.output.suffix.lower() != ".mp4":
        raise UserInputError(f"--output must be an .mp4 file, not '{args.output}'.")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise UserInputError(f"--fps must be a positive number, not {args.fps}.")
    if not args.video.exists():
        raise UserInputError(f"There is no video file or folder of frames at '{args.video}'.")
    settings = settings_from_args(args, VideoSettings).validated()
    from pipelines import models
    from pipelines.video import edit_video, parse_box

    boxes = [parse_box(spec) for spec in args.box]
    pipe = models.load(args.model, device=args.device)
    result = edit_video(pipe, args.video, args.source_prompt, args.prompt, boxes, settings,
                        cache_dir=args.cache_dir, fps=args.fps, progress=_progress)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        written = result.save(args.output)
    except OSError as error:
        raise UserInputError(f"Cannot write the result: {error.strerror or error} ({error.filename or args.output}).") \
            from error
    for path in written:
        print(path)
    timings = result.params["timings"]
    print("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items()))
    return 0


COMMANDS = {
    "edit-video": Command("edit a video with ReAtCo: boxes bound to words move and change objects, the rest stays",
                          add_edit_video_args, run_edit_video),
}
