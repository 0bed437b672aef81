"""`python app.py steer directions|pairs ...`: MedSteer steering directions and counterfactual pairs.

    python app.py steer directions --positive "..." --negative "..." --samples 100 --output D.safetensors
    python app.py steer pairs --directions D.safetensors --prompt "..." --beta 2 --seeds 0-99 --output DIR
    accelerate launch app.py steer pairs ...   # the seeds are split across the processes

The CLI registry is flat, so this is one "steer" command with its own sub-commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ui.cli_common import Command, add_model_args


def _add_directions_args(parser: argparse.ArgumentParser) -> None:
    from pipelines.steering import DEFAULT_SAMPLES, PAPER_DEFAULTS

    parser.add_argument("--positive", required=True, help="prompt of the concept to remove, e.g. "
                        f"\"{PAPER_DEFAULTS['positive']}\"")
    parser.add_argument("--negative", required=True, help="prompt of the concept to steer towards, e.g. "
                        f"\"{PAPER_DEFAULTS['negative']}\"")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help=f"images per prompt (default: {DEFAULT_SAMPLES})")
    parser.add_argument("--steps", type=int, default=PAPER_DEFAULTS["steps"],
                        help=f"denoising steps (default: {PAPER_DEFAULTS['steps']})")
    parser.add_argument("--guidance", type=float, default=None,
                        help="CFG scale (default: 4.5 on PixArt, the paper's; 7.5 on SD)")
    parser.add_argument("--cfg-negative-prompt", default="", help="CFG negative prompt (default: empty)")
    parser.add_argument("--width", type=int, default=None, help="default: the model's size")
    parser.add_argument("--height", type=int, default=None, help="default: the model's size")
    parser.add_argument("--base-seed", type=int, default=0, help="first seed (default: 0)")
    parser.add_argument("--layers", default=None, metavar="REGEX",
                        help="only the cross-attention layers whose name matches (default: all)")
    parser.add_argument("--matched", action="store_true",
                        help="use the same seeds for both prompts (default: different seeds, as the paper)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call (default: 4)")
    parser.add_argument("--output", type=Path, required=True, help="the .safetensors file to write")
    add_model_args(parser)


def _add_pairs_args(parser: argparse.ArgumentParser) -> None:
    from pipelines.steering import PAPER_DEFAULTS, STEER_CHOICES, STEP_MAPS

    parser.add_argument("--directions", type=Path, required=True, help="a file from 'steer directions'")
    parser.add_argument("--prompt", required=True, help="the prompt to generate and steer")
    parser.add_argument("--beta", type=float, default=PAPER_DEFAULTS["beta"],
                        help="steering strength: 1 removes, 2 reflects the concept (default: 2)")
    parser.add_argument("--seeds", default="0", help="seeds, e.g. 0-99 or 1,5,7 (default: 0)")
    parser.add_argument("--steps", type=int, default=None, help="default: the directions' steps")
    parser.add_argument("--guidance", type=float, default=None, help="default: the directions' guidance")
    parser.add_argument("--cfg-negative-prompt", default=None, help="default: the directions' one")
    parser.add_argument("--width", type=int, default=None, help="default: the directions' size")
    parser.add_argument("--height", type=int, default=None, help="default: the directions' size")
    parser.add_argument("--steer", choices=STEER_CHOICES, default="both",
                        help="CFG halves to steer: both (the paper's) or cond (default: both)")
    parser.add_argument("--step-map", choices=STEP_MAPS, default="clamp",
                        help="clamp: step t uses direction min(t, T-1) (the paper's); relative: rescale")
    parser.add_argument("--separate", action="store_true",
                        help="run the plain and steered images separately instead of in one batch")
    parser.add_argument("--allow-other-model", action="store_true",
                        help="accept directions estimated on another model of the same architecture")
    parser.add_argument("--output", type=Path, required=True,
                        help="folder for orig_seed*.png, steered_seed*.png, diff_seed*.png and manifest.jsonl "
                             "(re-running resumes)")
    add_model_args(parser)


def add_steer_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="steer_command", metavar="STEP", title="steps", required=True)
    _add_directions_args(sub.add_parser(
        "directions", help="estimate steering directions from a positive and a negative prompt",
        description="estimate steering directions from a positive and a negative prompt"))
    _add_pairs_args(sub.add_parser(
        "pairs", help="generate counterfactual pairs (plain and steered, same seed) into a folder",
        description="generate counterfactual pairs (plain and steered, same seed) into a folder"))


def _run_directions(args: argparse.Namespace) -> int:
    from pipelines import models
    from pipelines.errors import UserInputError
    from pipelines.steering import estimate_directions

    if args.output.suffix.lower() != ".safetensors":
        raise UserInputError(f"--output must be a .safetensors file, not '{args.output}'.")
    pipe = models.load(args.model, device=args.device)
    directions = estimate_directions(
        pipe, args.positive, args.negative, samples=args.samples, steps=args.steps, guidance=args.guidance,
        height=args.height, width=args.width, negative_prompt=args.cfg_negative_prompt,
        base_seed=args.base_seed, layers=args.layers, matched=args.matched, batch_size=args.batch_size,
    )
    path = directions.save(args.output)
    print(path)
    print(f"directions: {directions.steps} steps x {len(directions.layers)} layers, "
          f"{directions.meta['samples']} images per prompt")
    return 0


def _run_pairs(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from pipelines import models
    from pipelines.steering import Directions, generate_dataset, parse_seeds, validate_beta

    validate_beta(args.beta)
    seeds = parse_seeds(args.seeds)
    directions = Directions.load(args.directions)
    state = PartialState()  # one process without `accelerate launch`
    device = args.device
    if device is None and state.num_processes > 1:
        device = state.device  # each process its own GPU
    pipe = models.load(args.model, device=device)
    summary = generate_dataset(
        pipe, directions, args.prompt, seeds, args.output, beta=args.beta, steps=args.steps,
        guidance=args.guidance, negative_prompt=args.cfg_negative_prompt, height=args.height, width=args.width,
        steer=args.steer, step_map=args.step_map, batched=not args.separate,
        allow_other_model=args.allow_other_model, process_index=state.process_index,
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
