"""`python app.py steer directions|pairs ...`: MedSteer steering directions and counterfactual pairs.

    python app.py steer directions --concept "..." --replacement "..." --samples 100 --output D.safetensors
    python app.py steer pairs --directions D.safetensors --prompt "..." --beta 2 --seeds 0-99 --output DIR
    accelerate launch app.py steer pairs ...   # the seeds are split across the processes

The CLI registry is flat, so this is one "steer" command with its own sub-commands.  The prompt
pair is `--concept` (a prompt showing the concept to remove: MedSteer's "positive" prompt) and
`--replacement` (one showing what replaces it: MedSteer's "negative" prompt, not a negative
prompt in the Stable Diffusion sense), as the tab names them; `--positive` and `--negative`
still work, for the paper's readers and older scripts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.steering_settings import PAPER_NEGATIVE, PAPER_POSITIVE, DirectionSettings, PairSettings
from ui.cli_common import Command, add_model_args
from ui.cli_settings import add_settings_arguments, settings_from_args


def _add_directions_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concept", "--positive", dest="positive", required=True, metavar="PROMPT",
                        help="a prompt showing the concept to remove (MedSteer's positive prompt), e.g. "
                             f"\"{PAPER_POSITIVE}\"")
    parser.add_argument("--replacement", "--negative", dest="negative", required=True, metavar="PROMPT",
                        help="a prompt showing what replaces it (MedSteer's negative prompt; not a negative "
                             f"prompt in the Stable Diffusion sense), e.g. \"{PAPER_NEGATIVE}\"")
    add_settings_arguments(parser, DirectionSettings)  # every setting, with its default
    parser.add_argument("--output", type=Path, required=True, help="the .safetensors file to write")
    add_model_args(parser)


def _add_pairs_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--directions", type=Path, required=True, help="a file from 'steer directions'")
    parser.add_argument("--prompt", required=True, help="the prompt to generate and steer")
    parser.add_argument("--seeds", default="0", help="seeds, e.g. 0-99 or 1,5,7 (default: 0)")
    add_settings_arguments(parser, PairSettings)  # every setting, with its default
    parser.add_argument("--output", type=Path, required=True,
                        help="folder for orig_seed*.png, steered_seed*.png, diff_seed*.png and manifest.jsonl "
                             "(re-running resumes)")
    add_model_args(parser)


def add_steer_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="steer_command", metavar="STEP", title="steps", required=True)
    _add_directions_args(sub.add_parser(
        "directions", help="estimate steering directions from a prompt showing the concept and one showing "
                           "its replacement",
        description="estimate steering directions from a prompt showing the concept to remove (--concept) and "
                    "one showing what replaces it (--replacement)"))
    _add_pairs_args(sub.add_parser(
        "pairs", help="generate counterfactual pairs (plain and steered, same seed) into a folder",
        description="generate counterfactual pairs (plain and steered, same seed) into a folder"))


def _run_directions(args: argparse.Namespace) -> int:
    from pipelines import models
    from pipelines.errors import UserInputError
    from pipelines.steering import estimate_directions

    if args.output.suffix.lower() != ".safetensors":
        raise UserInputError(f"--output must be a .safetensors file, not '{args.output}'.")
    settings = settings_from_args(args, DirectionSettings).validated()  # before loading the model
    pipe = models.load(args.model, device=args.device)
    directions = estimate_directions(pipe, args.positive, args.negative, settings)
    path = directions.save(args.output)
    print(path)
    print(f"directions: {directions.steps} steps x {len(directions.layers)} layers, "
          f"{directions.meta['samples']} images per prompt")
    return 0


def _run_pairs(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from pipelines import models
    from pipelines.steering import Directions, generate_dataset, parse_seeds

    settings = settings_from_args(args, PairSettings).validated()  # before loading the model
    seeds = parse_seeds(args.seeds)
    directions = Directions.load(args.directions)
    state = PartialState()  # one process without `accelerate launch`
    device = args.device
    if device is None and state.num_processes > 1:
        device = state.device  # each process its own GPU
    pipe = models.load(args.model, device=device)
    summary = generate_dataset(
        pipe, directions, args.prompt, seeds, args.output, settings, process_index=state.process_index,
        num_processes=state.num_processes, wait=state.wait_for_everyone,
    )
    prefix = f"[process {state.process_index}] " if state.num_processes > 1 else ""
    print(f"{prefix}{len(summary.written)} pairs written, {len(summary.skipped)} already done, in {summary.folder}")
    if summary.manifest is not None:
        print(summary.manifest)
    return 0


def run_steer(args: argparse.Namespace) -> int:
    return {"directions": _run_directions, "pairs": _run_pairs}[args.steer_command](args)


COMMANDS = {
    "steer": Command("counterfactual steering (MedSteer): estimate directions, generate pairs",
                     add_steer_args, run_steer),
}
