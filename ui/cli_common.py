"""Pieces shared by the command-line modules (`ui/<task>_cli.py`): no Gradio here.

A task's CLI module defines `COMMANDS = {"name": Command(help, add_arguments, run)}`; app.py
finds it.  `run` returns an exit status; a `UserInputError` it raises becomes one
`error: <sentence>` line and exit status 2.

Folder mode (a folder of inputs, one result each: `erase`, `edit-video`) runs through
`run_folder`, which owns its conventions; the helpers below it are the checks and messages those
commands share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from pipelines.errors import UserInputError

DEFAULT_MODEL = "builtin"  # our trained model in assets/builtin: offline, real images on a CPU


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _device(value: str) -> str | None:
    return None if value == "auto" else value


def add_model_args(parser: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    parser.add_argument("--model", default=default,
                        help="built-in name (builtin: our trained shapes model; builtin-edit: its instruction-edit "
                             "model; tiny, tiny-sdxl, tiny-pixart, tiny-sd3, tiny-flux: random weights for tests), "
                             "a hub id already downloaded, a local diffusers folder or a single "
                             f".safetensors file (default: {default})")
    parser.add_argument("--device", default="auto", type=_device,
                        help="auto, cpu, cuda, cuda:1, mps ... (default: auto)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every loaded model's denoiser: its repeated blocks "
                             "(compile_repeated_blocks) where the model class supports it, else the whole "
                             "denoiser.  The first generation at each new size compiles (slow), later ones "
                             "run faster; every attention method keeps working (off by default)")


# ------------------------------------------------------------------------------ folder mode

Model = TypeVar("Model")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run_folder(items: Sequence[Path], *, is_done: Callable[[Path], bool], load: Callable[[], Model],
               process: Callable[[Model, int, Path], None], report_skip: Callable[[int, Path], None],
               report_start: Callable[[int, Path], None] = lambda index, item: None,
               failures: str, prefix: str = "") -> int:
    """Process every item of a folder run that is not done yet; the exit status.

    The conventions, the same for every folder command:
    - Which items are done (`is_done`) is decided for all of them before any work, so a rerun
      resumes where an interrupted one stopped.  A done item is only reported
      (`report_skip(index, item)`, in the items' order); its outputs are left as they are.
    - `load()` runs once, just before the first item that is not done: a rerun with every item
      done loads no model.  An error there is not an item's: it ends the run.
    - Each other item: `report_start(index, item)`, then `process(model, index, item)`, which
      writes its outputs and prints what it wrote.  A `UserInputError` from it is that item's
      failure: one `warning: NAME: sentence` line on stderr, and the batch goes on with the next
      item.  Any other exception ends the run (app.py reports it).
    - Last, the summary `PREFIX done: D, skipped: S, failed: F` on stdout; if any item failed,
      a `UserInputError` "F of N FAILURES (see the warnings above)." that app.py prints as the
      final `error:` line, with exit status 2.  Otherwise 0.
    `prefix` tells apart the lines of processes that share the batch (`erase` under accelerate).
    """
    finished = [is_done(item) for item in items]
    model, loaded = None, False
    done = failed = 0
    for index, (item, already_done) in enumerate(zip(items, finished)):
        if already_done:
            report_skip(index, item)
            continue
        report_start(index, item)  # before the (slow) first load: the user sees which item it is for
        if not loaded:
            model, loaded = load(), True
        try:
            process(model, index, item)
        except UserInputError as error:
            warn(f"{item.name}: {error}")
            failed += 1
            continue
        done += 1
    print(f"{prefix}done: {done}, skipped: {sum(finished)}, failed: {failed}")
    if failed:
        raise UserInputError(f"{failed} of {len(items)} {failures} (see the warnings above).")
    return 0


def folder_files(folder: Path) -> list[Path]:
    """The files of `folder`, sorted; hidden files and subfolders left out."""
    return [path for path in sorted(folder.iterdir()) if path.is_file() and not path.name.startswith(".")]


def warn_other_files(others: Sequence[Path], folder: Path, kind: str) -> None:
    """One warning for the files of a folder run that are not inputs (`kind`: "images", ...)."""
    if others:
        names = ", ".join(p.name for p in others[:5]) + (" ..." if len(others) > 5 else "")
        warn(f"{len(others)} file(s) in '{folder}' are not {kind} and were skipped: {names}")


def check_output_folder(output: Path, reason: str, file_suffixes: Collection[str]) -> None:
    """Refuse an --output that cannot be the folder a folder run writes into: an existing file,
    or a name with one of the single-run outputs' suffixes (`reason`: why it must be a folder)."""
    if output.exists() and not output.is_dir():
        raise UserInputError(f"{reason}, so --output must be a folder too, not the file '{output}'.")
    if output.suffix.lower() in file_suffixes:
        raise UserInputError(f"{reason}, so --output must be a folder, not '{output}'.")


def save_result(result, output: Path) -> list[Path]:
    """`result.save(output)`, a write that fails (disk full, no permission) as one sentence."""
    try:
        return result.save(output)
    except OSError as error:
        raise UserInputError(f"Cannot write the result: {error.strerror or error} ({error.filename or output}).") \
            from error
