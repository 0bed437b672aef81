"""`python app.py personalize train|generate ...`: DisenDiff / AttenCraft personalization.

    python app.py personalize train --image photo.png --concepts cat,dog --method disendiff --steps 250 --output run/
    python app.py personalize generate --concept run/learned.safetensors --prompt "a <new1> cat on the beach" \\
        --seed 42 --output cat.png
    accelerate launch app.py personalize train ...   # data-parallel: gradients averaged across processes

Rerunning `train` with the same --output resumes from its last checkpoint (and can extend
--steps).  The CLI registry is flat, so this is one "personalize" command with sub-commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.personalize import DEFAULT_METHOD, GENERATE_SEED, METHODS, SAMPLING
from ui.cli_common import Command, add_model_args
from ui.cli_settings import add_variant_arguments, variant_settings_from_args

#: each method's settings class (pipelines/personalize/disendiff.py, attencraft.py): the flags
SETTINGS = {name: kind.settings for name, kind in METHODS.items()}


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", type=Path, required=True, help="one photo holding the concepts")
    parser.add_argument("--concepts", required=True,
                        help="class word of each concept, comma-separated, e.g. cat,dog (single-token words)")
    parser.add_argument("--method", choices=tuple(METHODS), default=DEFAULT_METHOD,
                        help=" or ".join(f"{name} ({kind.summary})" for name, kind in METHODS.items())
                        + f" (default: {DEFAULT_METHOD})")
    parser.add_argument("--output", type=Path, required=True,
                        help="run folder: checkpoint.pt, learned.safetensors, prior/ (rerun to resume)")
    # every training setting of the methods, with each method's default
    add_variant_arguments(parser, SETTINGS, skip=SAMPLING)
    add_model_args(parser)


def _add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concept", type=Path, required=True, help="a learned.safetensors from 'personalize train'")
    parser.add_argument("--prompt", required=True, help="a prompt with a learned token, e.g. \"a <new1> cat\"")
    parser.add_argument("--negative-prompt", default="", help="what to avoid")
    parser.add_argument("--seed", type=int, default=GENERATE_SEED,
                        help=f"seed (default: {GENERATE_SEED}, the papers'; -1 = random)")
    # --steps and --guidance: the sampling settings, with the learned file's method's defaults
    add_variant_arguments(parser, SETTINGS, only=SAMPLING)
    parser.add_argument("--output", type=Path, required=True, help="PNG to write (a JSON sidecar goes next to it)")
    add_model_args(parser)


def add_personalize_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="personalize_command", metavar="STEP", title="steps", required=True)
    _add_train_args(sub.add_parser("train", help="learn the concepts of one image (resumable)",
                                   description="learn the concepts of one image (resumable)"))
    _add_generate_args(sub.add_parser("generate", help="generate with a learned file",
                                      description="generate with a learned file"))


def _load_fp32(args):
    import torch
    from accelerate import PartialState

    from pipelines import models

    state = PartialState()
    device = args.device
    if device is None and state.num_processes > 1:
        device = state.device
    return models.load(args.model, device=device, dtype=torch.float32)


def _run_train(args: argparse.Namespace) -> int:
    from pipelines.errors import UserInputError
    from pipelines.personalize import train

    if args.output.exists() and not args.output.is_dir():
        raise UserInputError(f"--output must be a folder, not the file '{args.output}'.")
    # every value checked (by the method's settings) before the model loads
    settings = variant_settings_from_args(args, SETTINGS, args.method, "--method", skip=SAMPLING).validated()
    pipe = _load_fp32(args)
    result = train(pipe, args.image, args.concepts, args.method, args.output, settings=settings)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    if result.path is not None:
        print(result.path)
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"trained {result.steps} steps{resumed}{last}; tokens: "
          + ", ".join(f"{t} {w}" for t, w in zip(result.learned.tokens, result.learned.class_words)))
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from pipelines.errors import UserInputError
    from pipelines.personalize import Learned, generate

    if args.output.suffix.lower() != ".png":
        raise UserInputError(f"--output must be a .png file, not '{args.output}'.")
    learned = Learned.load(args.concept)
    pipe = _load_fp32(args)
    result = generate(pipe, learned, args.prompt, seed=args.seed, steps=args.sample_steps,
                      guidance=args.sample_guidance, negative_prompt=args.negative_prompt)
    result.save(args.output)
    print(args.output)
    print(f"seed {result.seed}")
    return 0


def run_personalize(args: argparse.Namespace) -> int:
    return {"train": _run_train, "generate": _run_generate}[args.personalize_command](args)


COMMANDS = {
    "personalize": Command("learn several concepts from one image (DisenDiff, AttenCraft) and generate with them",
                           add_personalize_args, run_personalize),
}
