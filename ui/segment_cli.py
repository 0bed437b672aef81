"""`python app.py segment ...`: referring segmentation (RefAM) of an image, a video or a dataset folder.

    python app.py segment --image IMG --text "the dog on the left" --output MASK.png [--heatmap HEAT.png]
    python app.py segment --video VID.mp4 --text "the dog" --output OUT.mp4   # + OUT_overlay.mp4
    python app.py segment --folder DATASET --output OUT_DIR   # RefCOCO-like layout, resumable
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import UserInputError
from pipelines.grounding_settings import MAX_FRAMES, GroundingSettings
from ui.cli_common import Command, add_model_args
from ui.cli_settings import add_settings_arguments, settings_from_args

#: settings whose flag is not made by `add_settings_arguments`: a tuple of levels, given as text
_OWN_FLAGS = ("unet_levels",)


def add_segment_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="the image to segment")
    source.add_argument("--video", type=Path, help="a video: one mask per frame")
    source.add_argument("--folder", type=Path,
                        help="a dataset folder (expressions.json, images/, masks/; see benchmarks/refseg.py): "
                             "one mask per expression in --output, finished ones skipped")
    parser.add_argument("--text", help="the referring expression, e.g. \"the dog on the left\" (not with --folder)")
    parser.add_argument("--output", type=Path, required=True,
                        help="mask .png (image), mask video .mp4 (video) or a folder (--folder); "
                             "a JSON sidecar with every setting goes next to it")
    parser.add_argument("--heatmap", type=Path, default=None, help="also write the heatmap overlay here (.png, image only)")
    parser.add_argument("--max-frames", type=int, default=MAX_FRAMES,
                        help=f"read at most this many video frames (default: {MAX_FRAMES})")
    # every RefAM setting, with its default, from pipelines.grounding_settings.GroundingSettings
    add_settings_arguments(parser, GroundingSettings, skip=_OWN_FLAGS)
    parser.add_argument("--unet-levels", dest="unet_levels", default=None, metavar="LEVELS",
                        help=GroundingSettings.specs()["unet_levels"][1].help)
    add_model_args(parser)


def _check_paths(args) -> None:
    output: Path = args.output
    if args.folder is not None:
        if args.text:
            raise UserInputError("--text is not used with --folder: the expressions come from expressions.json.")
        if output.exists() and not output.is_dir():
            raise UserInputError(f"--output must be a folder with --folder, and '{output}' is a file.")
        return
    if not args.text or not args.text.strip():
        raise UserInputError("Please give the expression with --text, e.g. --text \"the dog on the left\".")
    if args.image is not None and output.suffix.lower() != ".png":
        raise UserInputError(f"--output must be a .png file for an image, not '{output}'.")
    if args.video is not None and output.suffix.lower() != ".mp4":
        raise UserInputError(f"--output must be an .mp4 file for a video, not '{output}'.")
    if args.heatmap is not None and (args.video is not None or args.heatmap.suffix.lower() != ".png"):
        raise UserInputError("--heatmap takes a .png file and works with --image only.")


def run_segment(args: argparse.Namespace) -> int:
    from pipelines import models
    from pipelines.grounding import read_refseg_folder, segment_image, segment_video

    _check_paths(args)
    settings = settings_from_args(args, GroundingSettings, model=args.model).validated()  # before loading the model
    samples = read_refseg_folder(args.folder) if args.folder is not None else None
    pipe = models.load(args.model, device=args.device)
    try:
        if args.image is not None:
            result = segment_image(pipe, args.image, args.text, settings)
            written = result.save(args.output, heatmap=args.heatmap)
            print(f"mask covers {result.mask.mean():.1%} of the image; sinks: {', '.join(result.sinks) or 'none'}")
        elif args.video is not None:
            result = segment_video(pipe, args.video, args.text, settings, max_frames=args.max_frames)
            written = result.save(args.output)
            print(f"{len(result.masks)} frames")
        else:
            written, skipped = [], 0
            for sample in samples:
                target = args.output / f"{sample.id}.png"
                if target.exists():  # written atomically: an existing file is a finished one
                    skipped += 1
                    continue
                result = segment_image(pipe, sample.image, sample.expression, settings)
                written += result.save(target)[:1]
            print(f"{len(written)} masks written, {skipped} already there")
    except OSError as error:
        raise UserInputError(f"Cannot write the results: {error.strerror or error} ({error.filename or args.output}).") from error
    for path in written:
        print(path)
    return 0


COMMANDS = {
    "segment": Command("segment the object a text names, in an image, a video or a dataset folder (RefAM)",
                       add_segment_args, run_segment),
}
