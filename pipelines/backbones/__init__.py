"""Backbones: the only place that knows model families.

One module per family owns its facts: how to recognise it, its size rules, how to call its
pipeline quietly, its text keys as named segments, how to encode a prompt, and one noisy
forward of its denoiser.  Tasks ask `of(pipe)` and program against `Backbone`
(pipelines/backbones/base.py); they never compare family names.  A new family is a new file
and one line in `ALL`.
"""

from __future__ import annotations

from pipelines.errors import UserInputError

from .base import OTHER, Backbone, EncodedText, TextLayout, TextSegment
from .flux import FLUX
from .flux_kontext import FLUX_KONTEXT
from .instruct_pix2pix import INSTRUCT_PIX2PIX
from .omnigen import OMNIGEN
from .pixart import PIXART
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL

#: every family the tasks know, in the order they are tried (InstructPix2Pix before SD: its UNet is SD's
#: with 8 input channels)
ALL: tuple[Backbone, ...] = (INSTRUCT_PIX2PIX, SD, SDXL, PIXART, SD3, FLUX, OMNIGEN, FLUX_KONTEXT)
#: families whose denoiser is another family's (FLUX Kontext's is FLUX.1's), told apart by the pipeline
#: (`matches_pipeline`) before `of` asks the denoiser
BY_PIPELINE: tuple[Backbone, ...] = (FLUX_KONTEXT,)
#: the families that draw an image from text alone (what text-to-image tasks accept)
TEXT_TO_IMAGE: tuple[Backbone, ...] = tuple(backbone for backbone in ALL if backbone.text_to_image)

__all__ = ["ALL", "BY_PIPELINE", "Backbone", "EncodedText", "FLUX", "FLUX_KONTEXT", "INSTRUCT_PIX2PIX", "OMNIGEN", "OTHER", "PIXART", "SD", "SD3", "SDXL", "TEXT_TO_IMAGE", "TextLayout",
           "TextSegment", "by_pipeline_class", "of", "require", "sentence_list"]


def of(pipe) -> Backbone:
    """The pipeline's backbone, decided from its denoiser (so every `from_pipe` variant keeps it), except
    for the `BY_PIPELINE` families, whose denoiser is another family's."""
    named = next((backbone for backbone in BY_PIPELINE if backbone.matches_pipeline(pipe)), None)
    if named is not None:
        return named
    components = pipe.components
    denoiser = components.get("transformer") or components.get("unet")
    return next((backbone for backbone in ALL if backbone.matches(denoiser)), OTHER)


def by_pipeline_class(class_name: str) -> Backbone:
    """The backbone of a `model_index.json` `_class_name`, without loading anything."""
    return next((backbone for backbone in ALL if class_name in backbone.pipeline_classes), OTHER)


def sentence_list(backbones: tuple[Backbone, ...]) -> str:
    """"SD 1.x/2.x", "SD 1.x/2.x and SDXL", "FLUX, SD3 and SD 1.x/2.x": the labels without the
    architecture word ("SD3 MMDiT" -> "SD3")."""
    names = [backbone.label.rsplit(" ", 1)[0] for backbone in backbones]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def require(pipe, supported: tuple[Backbone, ...], task: str) -> Backbone:
    """The pipeline's backbone, or UserInputError naming the families `task` works with."""
    backbone = of(pipe)
    if backbone not in supported:
        raise UserInputError(f"{task} works with {sentence_list(supported)} models, not with this {backbone.label}.")
    return backbone
