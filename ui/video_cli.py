"""`python app.py edit-video ...`: edit a clip with ReAtCo (boxes bound to words of the prompt),
or every clip of a folder.

    python app.py edit-video --video clip.mp4 --source-prompt "a red circle on a striped background" \
        --prompt "a blue square on a striped background" --box square:8,8,40,40 --output edited.mp4
    python app.py edit-video ... --box square:8,8,40,40@0 --box square:20,8,52,40@7   # a moving box
    python app.py edit-video ... --motion-adapter path/to/animatediff-motion-adapter   # AnimateDiff
    python app.py edit-video --video clips/ ... --output edited/   # every clip of a folder, resumable

Writes OUT.mp4 (the source's frame rate, and its audio when it has some), OUT_side_by_side.mp4,
one OUT_attn_<i>_<word>.mp4 heatmap video per bound word and OUT.json (every setting, the boxes,
the timings).  Every setting of pipelines/video_settings.py is a flag (`--help` shows the paper's
defaults).  The per-video fine-tune and the inversion are cached in --cache-dir, so editing the
same clip again (other boxes, another prompt) skips them, and an interrupted fine-tune resumes.
`--motion-adapter DIR` runs the edit on AnimateDiff (the model's UNet with a diffusers
MotionAdapter's motion modules; beyond the paper, pipelines/video/motion.py) instead of the
Tune-A-Video inflation, with no fine-tune unless --tune-steps asks for one.

Folder mode: when --video is a folder of video files (rather than a folder of frames), every clip
is edited with the same prompts, boxes and settings into the folder --output, clip NAME.ext giving
OUTPUT/NAME.mp4 and its side-by-side, heatmaps and NAME.json as above.  The JSON is written last
and atomically (every MP4 is atomic too), so a clip is done when NAME.json, NAME.mp4 and
NAME_side_by_side.mp4 are all there: a rerun of the same command skips it (no model is loaded
when every clip is done), and a clip with only some of its files is edited again (its old JSON is
removed first).  Done clips are not compared with the current prompts or settings: a different
edit needs another --output folder.  A clip that fails on bad input (unreadable, too short, a box
outside its frame, ...) is one `warning:` line and the batch goes on; a summary line (done,
skipped, failed) ends the run, and the exit status is 2 if any clip failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.errors import UserInputError
from pipelines.video_settings import VideoSettings
from ui.cli_common import (Command, add_model_args, check_output_folder, folder_files, run_folder, save_result,
                           warn_other_files)
from ui.cli_settings import add_settings_arguments, settings_from_args


def add_edit_video_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", type=Path, required=True,
                        help="the clip: .mp4, .webm, .gif, .mov, .avi, .mkv, or a folder of frames; or a folder "
                             "of such video files, each edited in turn (resumable: finished clips are skipped)")
    parser.add_argument("--source-prompt", required=True, help="what the clip shows (used for the fine-tune)")
    parser.add_argument("--prompt", required=True, help="the edited clip's prompt")
    parser.add_argument("--box", action="append", default=[], metavar="WORD:x1,y1,x2,y2[@FRAME]",
                        help="a box in source-frame pixels bound to a word of --prompt (repeatable; several "
                             "@FRAME keyframes of one word are interpolated)")
    parser.add_argument("--output", type=Path, required=True,
                        help="the edited .mp4, or a folder when --video is a folder of video files")
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


def _prepare(args: argparse.Namespace) -> tuple[VideoSettings, list]:
    """The settings and the boxes, checked before any model is loaded."""
    import math

    from pipelines.video import parse_box

    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise UserInputError(f"--fps must be a positive number, not {args.fps}.")
    settings = settings_from_args(args, VideoSettings).validated()
    return settings, [parse_box(spec) for spec in args.box]


def _edit(pipe, video: Path, args: argparse.Namespace, settings: VideoSettings, boxes: list, output: Path):
    """Edit `video` and save it as `output` (+ side-by-side, heatmaps, JSON): (result, written paths)."""
    from pipelines.video import edit_video

    result = edit_video(pipe, video, args.source_prompt, args.prompt, boxes, settings,
                        cache_dir=args.cache_dir, fps=args.fps, progress=_progress)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return result, save_result(result, output)


def _report(result, written: list[Path]) -> None:
    for path in written:
        print(path)
    timings = result.params["timings"]
    print("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items()))


def run_edit_video(args: argparse.Namespace) -> int:
    if args.video.is_dir():
        videos, images, others = _folder_files(args.video)
        if videos and images:
            raise UserInputError(f"The folder '{args.video}' holds both frames (images) and video files; give a "
                                 "folder of frames (one clip) or a folder of video files (one edit each), not both.")
        if not videos and not images:
            raise UserInputError(f"The folder '{args.video}' has no frames (images) and no video files "
                                 f"({', '.join(sorted(_video_suffixes()))}).")
        if videos:
            return _run_folder(args, videos, others)
    if args.output.suffix.lower() != ".mp4":
        raise UserInputError(f"--output must be an .mp4 file, not '{args.output}'.")
    if not args.video.exists():
        raise UserInputError(f"There is no video file or folder of frames at '{args.video}'.")
    settings, boxes = _prepare(args)
    from pipelines import models

    pipe = models.load(args.model, device=args.device)
    _report(*_edit(pipe, args.video, args, settings, boxes, args.output))
    return 0


# ------------------------------------------------------------------------------ folder mode


def _video_suffixes() -> set[str]:
    from pipelines.io import VIDEO_SUFFIXES

    return VIDEO_SUFFIXES


def _folder_files(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """The folder's video files, images and other files (sorted; hidden files and subfolders left out)."""
    from pipelines.io import IMAGE_SUFFIXES

    videos, images, others = [], [], []
    for path in folder_files(folder):
        suffix = path.suffix.lower()
        (videos if suffix in _video_suffixes() else images if suffix in IMAGE_SUFFIXES else others).append(path)
    return videos, images, others


def _check_names(videos: list[Path], output: Path) -> None:
    """Two clips whose outputs would overwrite each other (a.mp4 and a.webm; a.mp4 and the
    a_side_by_side.mp4 of an earlier run): one sentence.  Compared case-insensitively, as some
    file systems are."""
    owners: dict[str, Path] = {}
    for video in videos:
        for name in (video.stem, f"{video.stem}_side_by_side"):
            other = owners.setdefault(name.casefold(), video)
            if other != video:
                raise UserInputError(f"'{other.name}' and '{video.name}' would both write '{name}.mp4' in '{output}'; "
                                     "rename or move one of them.")
    for video in videos:
        for other in videos:
            if other.stem.casefold().startswith(f"{video.stem}_attn_".casefold()):
                raise UserInputError(f"'{other.name}' could be overwritten by the heatmap videos of '{video.name}' "
                                     f"in '{output}'; rename or move one of them.")


def _sidecar(target: Path) -> Path:
    return target.with_suffix(".json")


def is_done(target: Path) -> bool:
    """Whether the clip edited into `target` (OUTPUT/NAME.mp4) is finished: its JSON, written last
    and atomically by `VideoEditResult.save`, its MP4 and its side-by-side are all there."""
    return all(p.is_file() for p in (_sidecar(target), target, target.with_name(f"{target.stem}_side_by_side.mp4")))


def _run_folder(args: argparse.Namespace, videos: list[Path], others: list[Path]) -> int:
    output: Path = args.output
    check_output_folder(output, "--video is a folder of video files", _video_suffixes() | {".json"})
    if output.resolve() == args.video.resolve():
        raise UserInputError(f"--output must be another folder than --video ('{args.video}'): the edited clips would "
                             "replace their sources.")
    _check_names(videos, output)
    settings, boxes = _prepare(args)
    warn_other_files(others, args.video, "videos")

    def target(video: Path) -> Path:
        return output / f"{video.stem}.mp4"

    def head(index: int, video: Path) -> str:
        return f"clip {index + 1}/{len(videos)}: {video.name}"

    def load():
        from pipelines import models

        return models.load(args.model, device=args.device)

    def edit_one(pipe, index: int, video: Path) -> None:
        from pipelines.errors import out_of_memory_message, release_memory

        sidecar = _sidecar(target(video))
        try:
            sidecar.unlink(missing_ok=True)  # a stale record must not mark a half-redone clip done
        except OSError as error:
            raise UserInputError(f"Cannot remove the old '{sidecar}': {error.strerror or error}.") from error
        try:
            _report(*_edit(pipe, video, args, settings, boxes, target(video)))
        except Exception as error:  # noqa: BLE001 - out of memory on one (longer, larger) clip: the next may fit
            if (message := out_of_memory_message(error)) is None:
                raise
            release_memory(error)
            raise UserInputError(message) from error  # this clip's failure: a warning, and the batch goes on

    return run_folder(
        videos, is_done=lambda video: is_done(target(video)), load=load, process=edit_one,
        report_skip=lambda index, video: print(f"{head(index, video)}: skipped (already done: "
                                               f"{_sidecar(target(video))})", file=sys.stderr, flush=True),
        report_start=lambda index, video: print(head(index, video), file=sys.stderr, flush=True),
        failures="clips could not be edited")


COMMANDS = {
    "edit-video": Command("edit a video (or every clip of a folder) with ReAtCo: boxes bound to words move and "
                          "change objects, the rest stays",
                          add_edit_video_args, run_edit_video),
}
