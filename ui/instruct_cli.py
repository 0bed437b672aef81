"""`python app.py instruct ...`: edit an image by a multi-part instruction (SaaS on OmniGen, the
paper's backbone, or, our extrapolation, on FLUX Kontext (`--model tiny-flux-kontext`) or
InstructPix2Pix),
or draw a prompt of parts with a text-to-image model (SaaS on SD 1.x/2.x and SDXL, our extrapolation).

    python app.py instruct --image IN.png --instruction "make the circle blue, and make the square red" \
        --output OUT.png [--plain PLAIN.png] [--no-saas] [--model builtin-edit] [--seed 0]
    python app.py instruct --prompt "a red circle and a blue square on a striped background" \
        --output OUT.png [--plain PLAIN.png] [--model builtin]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import UserInputError
from pipelines.instruct_settings import InstructSettings
from ui.cli_common import Command, add_model_args
from ui.cli_settings import add_settings_arguments, settings_from_args

DEFAULT_EDIT_MODEL = "builtin-edit"
DEFAULT_DRAW_MODEL = "builtin"  # --prompt: a text-to-image model


def add_instruct_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", type=Path, help="the image to edit (with --instruction)")
    parser.add_argument("--instruction",
                        help="what to change, parts separated by commas, e.g. "
                             "\"make the circle blue, and make the background beige\"")
    parser.add_argument("--prompt",
                        help="instead of --image and --instruction: a prompt of parts to draw with a text-to-image "
                             f"model (default then: {DEFAULT_DRAW_MODEL}), parts separated by commas or 'and', e.g. "
                             "\"a red circle and a blue square on a striped background\"")
    parser.add_argument("--output", type=Path, required=True,
                        help="the edited .png; a JSON sidecar with every setting, the parts and the gains per step "
                             "goes next to it")
    parser.add_argument("--plain", type=Path, default=None,
                        help="also write plain sampling with the same seed here (.png): the baseline")
    parser.add_argument("--seed", type=int, default=0, help="random seed (-1: draw one; default: 0)")
    # every SaaS setting, with its default, from pipelines.instruct_settings.InstructSettings
    add_settings_arguments(parser, InstructSettings)
    add_model_args(parser, default=DEFAULT_EDIT_MODEL)


def run_instruct(args: argparse.Namespace) -> int:
    from pipelines import models
    from pipelines.instruct import edit_by_instruction, generate_by_parts, instruction_parts
    from pipelines.io import save_image

    drawing = args.prompt is not None
    if drawing and (args.image is not None or args.instruction is not None):
        raise UserInputError("Give either --prompt (draw a prompt of parts) or --image with --instruction (edit), "
                             "not both.")
    if not drawing and (args.image is None or args.instruction is None):
        raise UserInputError("Give --image and --instruction to edit an image, or --prompt to draw a prompt of parts.")
    for flag, path in (("--output", args.output), ("--plain", args.plain)):
        if path is not None and path.suffix.lower() != ".png":
            raise UserInputError(f"{flag} must be a .png file, not '{path}'.")
    if not drawing and not args.image.is_file():
        raise UserInputError(f"There is no image at '{args.image}'.")
    settings = settings_from_args(args, InstructSettings).validated()  # before loading the model
    # a bad instruction or prompt is one sentence before the model loads
    instruction_parts(args.prompt if drawing else args.instruction, split_and=drawing)
    if args.plain is not None and not settings.saas:
        raise UserInputError("--plain writes the baseline next to the SaaS result; with --no-saas the output is "
                             "already plain sampling.")
    model = DEFAULT_DRAW_MODEL if drawing and args.model == DEFAULT_EDIT_MODEL else args.model
    pipe = models.load(model, device=args.device)
    if drawing:
        result = generate_by_parts(pipe, args.prompt, settings, seed=args.seed, compare=args.plain is not None)
    else:
        result = edit_by_instruction(pipe, args.image, args.instruction, settings, seed=args.seed,
                                     compare=args.plain is not None)
    record = {**result.params, "instruction": result.instruction, "parts": result.parts, "seed": result.seed,
              "gains_per_step": result.gains, "notes": result.notes}
    try:
        written = save_image(result.edited, args.output, record)
        if args.plain is not None:
            written += save_image(result.plain, args.plain, {**record, "saas": False})
    except OSError as error:
        raise UserInputError(f"Cannot write the results: {error.strerror or error} ({error.filename or args.output}).") from error
    print(f"{len(result.parts)} parts: " + "; ".join(f"'{p}'" for p in result.parts) + f" (seed {result.seed})")
    if result.gains:
        print("gains at the last rescaled step: " + ", ".join(f"{g:.2f}" for g in result.gains[-1]))
    for note in result.notes:
        print(note)
    for path in written:
        print(path)
    return 0


COMMANDS = {
    "instruct": Command("edit an image by a multi-part instruction, or draw a prompt of parts, every part "
                        "carried out (SaaS)",
                        add_instruct_args, run_instruct),
}
