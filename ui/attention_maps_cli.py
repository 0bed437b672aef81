"""`python app.py generate ...`: an image and one attention heatmap per prompt word."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import UserInputError
from ui.cli_common import Command, add_model_args

def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument("--negative-prompt", default="", help="what to avoid")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: a random one, printed)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: the model's; 25 for the built-in model and SD)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the model's; SD's is 7.5)")
    parser.add_argument("--width", type=int, default=None, help="default: the model's size")
    parser.add_argument("--height", type=int, default=None, help="default: the model's size")
    parser.add_argument("--layers", default="all",
                        help="which attention layers to average: all, down, mid, up (default: all)")
    parser.add_argument("--output", type=Path, default=Path("outputs/attention_maps.png"),
                        help="image to write; a JSON sidecar with the parameters goes next to it "
                             "(default: outputs/attention_maps.png)")
    parser.add_argument("--heatmaps", type=Path, default=None, metavar="DIR",
                        help="folder for one heatmap PNG per word (default: next to --output, "
                             "named <output>_heatmaps)")
    add_model_args(parser)


def run_generate(args: argparse.Namespace) -> int:
    from pipelines import models
    from pipelines.attention_maps import generate_with_attention_maps

    output: Path = args.output
    if output.suffix.lower() != ".png":
        raise UserInputError(f"--output must be a .png file, not '{output}'.")
    heatmap_dir = args.heatmaps or output.with_name(f"{output.stem}_heatmaps")

    pipe = models.load(args.model, device=args.device)
    result = generate_with_attention_maps(
        pipe, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
        layers=args.layers,
    )
    try:
        written = result.save(output, heatmap_dir=heatmap_dir)
    except OSError as error:
        raise UserInputError(f"Cannot write the results: {error.strerror or error} "
                             f"({error.filename or output}).") from error
    for path in written:
        print(path)
    print(f"seed: {result.seed}")
    return 0


COMMANDS = {
    "generate": Command("generate an image and one attention heatmap per prompt word",
                        add_generate_args, run_generate),
}
