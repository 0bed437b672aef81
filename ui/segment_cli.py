"""`python app.py segment ...`: referring segmentation (RefAM) of an image, a video or a dataset folder.

    python app.py segment --image IMG --text "the dog on the left" --output MASK.png [--heatmap HEAT.png]
    python app.py segment --video VID.mp4 --text "the dog" --output OUT.mp4   # + OUT_overlay.mp4
    python app.py segment --folder DATASET --output OUT_DIR   # RefCOCO-like layout, resumable
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import UserInputError
from ui.cli_common import Command, add_model_args


def _threshold(value: str):
    if value == "otsu":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'otsu' or a number between 0 and 1, not {value!r}")


def add_segment_args(parser: argparse.ArgumentParser) -> None:
    from pipelines.grounding_settings import GroundingSettings

    d = GroundingSettings()
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
    parser.add_argument("--size", type=int, default=None, help="working long side in pixels (default: 1024 FLUX/SD3, the model's own size for UNets: 512 SD 1.5)")
    parser.add_argument("--sigma", type=float, default=d.sigma, help=f"DiT noise level (default: {d.sigma})")
    parser.add_argument("--timestep", type=int, default=d.timestep, help=f"UNet noise timestep (default: {d.timestep})")
    parser.add_argument("--depth", default=d.depth, help=f"DiT layers: first, middle, last, middle+last, all (default: {d.depth})")
    parser.add_argument("--blocks", default=d.blocks, help=f"FLUX blocks: dual, single, both (default: {d.blocks})")
    parser.add_argument("--norm", default=d.norm, help=f"text_softmax, full_row or raw (default: {d.norm})")
    parser.add_argument("--gas", default=d.gas, help=f"attention sinks: none, exclude, suppress, redirect (default: {d.gas})")
    parser.add_argument("--magnets", type=int, default=d.magnets, help=f"appended stop words, 0-8 (default: {d.magnets})")
    parser.add_argument("--no-colour", action="store_true", help="do not append a colour word")
    parser.add_argument("--target", default=d.target, help=f"content or head (default: {d.target})")
    parser.add_argument("--threshold", type=_threshold, default=d.threshold,
                        help="'otsu' or a fixed threshold in (0, 1) (default: otsu)")
    parser.add_argument("--refine", action="store_true", help="refine by self-attention propagation (SD UNets)")
    parser.add_argument("--sam2", default=None, metavar="FOLDER_OR_ID",
                        help="a local SAM2 model (transformers format) for point prompts (default: off)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"noise seed (default: {d.seed})")
    parser.add_argument("--batch-frames", type=int, default=d.batch_frames, help=f"video frames per forward (default: {d.batch_frames})")
    parser.add_argument("--max-frames", type=int, default=600, help="read at most this many video frames (default: 600)")
    add_model_args(parser)


def settings_from_args(args: argparse.Namespace):
    from pipelines.grounding_settings import GroundingSettings

    return GroundingSettings(
        size=args.size, sigma=args.sigma, timestep=args.timestep, depth=args.depth, blocks=args.blocks,
        norm=args.norm, gas=args.gas, magnets=args.magnets, colour=not args.no_colour, target=args.target,
        threshold=args.threshold, refine=args.refine, sam2=args.sam2, seed=args.seed,
        batch_frames=args.batch_frames,
    )


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
    settings = settings_from_args(args)
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
