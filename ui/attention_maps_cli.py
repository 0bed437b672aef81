"""`python app.py generate ...`: an image and one attention heatmap per prompt word."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.attention_maps_settings import AttentionMapSettings
from pipelines.errors import UserInputError
from ui.cli_common import Command, add_model_args
from ui.cli_settings import add_settings_arguments, settings_from_args


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: a random one, printed)")
    # every setting (--negative-prompt, --steps, --guidance, --height, --width, --layers, ...) with
    # its default, from pipelines.attention_maps_settings.AttentionMapSettings
    add_settings_arguments(parser, AttentionMapSettings)
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
    settings = settings_from_args(args, AttentionMapSettings).validated()  # before loading the model

    pipe = models.load(args.model, device=args.device)
    result = generate_with_attention_maps(pipe, args.prompt, settings, seed=args.seed)
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
