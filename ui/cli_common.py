"""Pieces shared by the command-line modules (`ui/<task>_cli.py`): no Gradio here.

A task's CLI module defines `COMMANDS = {"name": Command(help, add_arguments, run)}`; app.py
finds it.  `run` returns an exit status; a `UserInputError` it raises becomes one
`error: <sentence>` line and exit status 2.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

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
