"""`python app.py erase ...`: remove an object from one image, or from every image of a folder.

    python app.py erase --image photo.jpg --mask mask.png --output clean.png [--seed 0] [--steps 50]
    python app.py erase --image photos/ --mask masks/ --output cleaned/      # masks matched by name
    python app.py erase --image photos/ --mask one_mask.png --output cleaned/ # one mask for all
    accelerate launch app.py erase --image photos/ --mask masks/ --output cleaned/  # split over GPUs
    torchrun --standalone --nproc_per_node 2 app.py erase ...                       # or CPU processes

Folder mode writes OUTPUT/<image stem>.png (and a JSON sidecar) per image, skips images whose
outputs already exist (an interrupted batch resumes where it stopped), and under
`accelerate launch` gives each process a contiguous share of the sorted file list (accelerate's
`PartialState.split_between_processes`).  A bad file is reported in one line and the batch goes
on; the exit status is 2 if any image failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.eraser_settings import EraserSettings
from pipelines.errors import UserInputError
from ui.cli_common import (Command, add_model_args, check_output_folder, folder_files, run_folder, save_result, warn,
                           warn_other_files)
from ui.cli_settings import add_settings_arguments, settings_from_args


def add_erase_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", type=Path, required=True,
                        help="the image, or a folder of images")
    parser.add_argument("--mask", type=Path, required=True,
                        help="the object mask (white = remove), a folder of masks named like the images "
                             "(<stem>.png or <stem>_mask.png), or one mask for every image of the folder")
    parser.add_argument("--output", type=Path, required=True,
                        help="the .png to write, or a folder in folder mode; a JSON sidecar with the "
                             "parameters goes next to each image")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: a random one per image, printed and saved)")
    # every setting of the method, with its default, from pipelines.eraser.EraserSettings
    add_settings_arguments(parser, EraserSettings)
    add_model_args(parser)


def _options(args: argparse.Namespace) -> dict:
    return dict(seed=args.seed, settings=settings_from_args(args, EraserSettings, model=args.model))


def output_paths(output: Path, num_images: int) -> list[Path]:
    """The images one input produces (as `EraserResult.output_paths`)."""
    if num_images == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(num_images)]


def is_done(output: Path, num_images: int) -> bool:
    """Every image of this output and its sidecar exist (both are written atomically)."""
    return all(p.is_file() and p.with_suffix(".json").is_file() for p in output_paths(output, num_images))


def run_erase(args: argparse.Namespace) -> int:
    if args.image.is_dir():
        return _run_folder(args)
    if args.output.suffix.lower() != ".png":
        raise UserInputError(f"--output must be a .png file, not '{args.output}'.")
    if args.mask.is_dir():
        raise UserInputError(f"--mask is a folder ('{args.mask}') but --image is one file; pass the mask file.")
    for flag, path in (("image", args.image), ("mask", args.mask)):
        if not path.is_file():
            raise UserInputError(f"There is no {flag} file at '{path}'.")
    from pipelines import models
    from pipelines.eraser import describe_work, erase

    pipe = models.load(args.model, device=args.device)
    result = erase(pipe, args.image, args.mask, **_options(args))
    for note in result.notes:
        warn(note)
    if list(result.params["region"]) != [0, 0, *result.input.size]:  # only part of the image was processed
        print(describe_work(result.params, result.input.size).split("\n\n")[0], file=sys.stderr)
    for path in save_result(result, args.output):
        print(path)
    print("seed: " + ", ".join(str(s) for s in result.seeds))
    return 0


# ------------------------------------------------------------------------------ folder mode


def _images_in(folder: Path, exclude_masks: bool) -> tuple[list[Path], list[Path]]:
    from pipelines.io import IMAGE_SUFFIXES

    images, others = [], []
    for path in folder_files(folder):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            others.append(path)
        elif not (exclude_masks and path.stem.endswith("_mask")):
            images.append(path)
    return images, others


def _mask_for(image: Path, masks: Path) -> Path:
    if masks.is_file():
        return masks
    from pipelines.io import IMAGE_SUFFIXES

    for stem in (image.stem, f"{image.stem}_mask"):
        for suffix in sorted(IMAGE_SUFFIXES):
            for candidate in (masks / f"{stem}{suffix}", masks / f"{stem}{suffix.upper()}"):
                if candidate.is_file() and candidate != image:
                    return candidate
    raise UserInputError(f"There is no mask for '{image.name}' in '{masks}' (expected {image.stem}.png or {image.stem}_mask.png).")


def process_share(items: list, state) -> list:
    """This process's contiguous share of `items` (accelerate's split; all of them in one process)."""
    with state.split_between_processes(list(items)) as mine:
        return list(mine)


def _run_folder(args: argparse.Namespace) -> int:
    if not args.mask.exists():
        raise UserInputError(f"There is no mask file or folder at '{args.mask}'.")
    check_output_folder(args.output, "--image is a folder", {".png"})
    same_folder = args.mask.is_dir() and args.mask.resolve() == args.image.resolve()
    images, others = _images_in(args.image, exclude_masks=same_folder)
    if not images:
        raise UserInputError(f"The folder '{args.image}' has no images (.png, .jpg, .webp, ...).")
    import torch
    from accelerate import PartialState

    # on CPUs accelerate forms a process group only when asked to (torchrun / accelerate launch)
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    mine = process_share(images, state)
    prefix = f"[process {state.process_index}/{state.num_processes}] " if state.num_processes > 1 else ""
    if state.is_main_process:
        warn_other_files(others, args.image, "images")
    options = _options(args)

    def target(path: Path) -> Path:
        return args.output / f"{path.stem}.png"

    def load():
        from pipelines import models

        # erase(progress=False) shows no bar of its own; the shared pipeline is left as loaded
        return models.load(args.model, device=args.device or (state.device if state.num_processes > 1 else None))

    def erase_one(pipe, index: int, path: Path) -> None:
        from pipelines.eraser import erase

        result = erase(pipe, path, _mask_for(path, args.mask), progress=False, **options)
        for note in result.notes:
            warn(f"{path.name}: {note}")
        written = save_result(result, target(path))
        print(f"{prefix}{written[0]} (seed {', '.join(str(s) for s in result.seeds)})")

    return run_folder(mine, is_done=lambda path: is_done(target(path), options["settings"].num_images),
                      load=load, process=erase_one,
                      report_skip=lambda index, path: print(f"{prefix}skipped (already done): {path.name}"),
                      failures="images could not be processed", prefix=prefix)


COMMANDS = {
    "erase": Command("remove an object from an image (or a folder of images) with Attentive Eraser",
                     add_erase_args, run_erase),
}
