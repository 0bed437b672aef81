"""Instruction edit: an image and a multi-part instruction ("make the circle blue, and make the
background beige") edited by an InstructPix2Pix model, with SaaS (self-adaptive attention
scaling; ICCV 2025) so that no part of the instruction is neglected.

    from pipelines import models
    from pipelines.instruct import edit_by_instruction

    pipe = models.load("builtin-edit")
    result = edit_by_instruction(pipe, "scene.png", "make the circle blue, and make the square red", seed=0)
    result.edited, result.plain        # SaaS and plain sampling with the same seed
    result.save("out/")                # edited.png, plain.png, masks, result.json

The paper's backbone is OmniGen, whose input image is attention tokens that out-compete the
text.  InstructPix2Pix (and our `builtin-edit`) takes the image by channel concatenation, so on
these models SaaS is our extrapolation (docs/methods/instruction.md, spec section 6): each part's
cross-attention map in the instruction row gives a mask (blur, min-max, Otsu), and inside its
mask the part's attention is boosted by a gain that equalises the parts' attention (capped at
`max_gain`), measured on the previous step.  The attention mechanism is
`attention_processors/saas.py`; this module validates the inputs, runs the pipeline twice with
one seed (SaaS and plain, the baseline), and returns what it saw: the masks and gains per step.

Sizes: the image is resized (aspect kept) so that its longer side is the model's native side,
rounded to the model's grid multiple; the result has that working size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import backbones, models
from .errors import UserInputError
from .instruct_settings import INSTRUCT, MAX_PARTS, InstructSettings
from .io import atomic_path, load_image, save_image
from .seeds import resolve_seed
from .tokenizers import check_fits

__all__ = ["InstructResult", "edit_by_instruction", "generate_by_parts", "instruction_parts", "working_size"]

SUPPORTED = (backbones.INSTRUCT_PIX2PIX,)
TASK = "Instruction edit"
#: multi-part text-to-image (spec section 7): SD 1.x/2.x UNets, whose attn2 levels `sd_layers` knows
T2I_SUPPORTED = (backbones.SD,)
T2I_TASK = "Multi-part generation"


@dataclass
class InstructResult:
    """What one instruction edit made and saw."""

    source: Image.Image | None  # the input at working size (None: generated from a prompt of parts)
    edited: Image.Image  # with SaaS (or plain when SaaS was off)
    plain: Image.Image | None  # plain sampling with the same seed (None when not asked for)
    instruction: str
    parts: list[str]
    seed: int
    masks: list[np.ndarray] = field(default_factory=list, repr=False)  # per rescaled step: (K, h, w) bool
    gains: list[list[float]] = field(default_factory=list)  # per rescaled step: K gains
    params: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # sentences for the user (e.g. one part: SaaS is a no-op)

    def mask_gallery(self, every: int = 1) -> list[tuple[Image.Image, str]]:
        """(picture, caption) per part and recorded step: the part's mask over the source, with its gain."""
        pictures = []
        for index in range(0, len(self.masks), max(1, every)):
            masks, gains = self.masks[index], self.gains[index]
            for k, part in enumerate(self.parts):
                if k >= len(masks):
                    continue
                under = self.source if self.source is not None else self.edited
                mask = np.asarray(Image.fromarray(masks[k].astype(np.uint8) * 255).resize(under.size,
                                                                                        Image.NEAREST)) > 127
                base = np.asarray(under, dtype=np.float32)
                tinted = base.copy()
                tinted[mask] = 0.45 * base[mask] + 0.55 * np.array([255.0, 40.0, 40.0])
                picture = Image.fromarray(np.uint8(tinted)).resize((128, 128 * under.height // under.width),
                                                                 Image.NEAREST)
                pictures.append((picture, f"step {self.params['saas_steps'][index]}: '{part}', gain {gains[k]:.2f}"))
        return pictures

    def save(self, folder: str | Path) -> list[Path]:
        """Write edited.png, plain.png (if made), source.png (an edit) and result.json (settings, parts, gains)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = save_image(self.edited, folder / "edited.png", None)
        if self.plain is not None:
            written += save_image(self.plain, folder / "plain.png", None)
        if self.source is not None:
            written += save_image(self.source, folder / "source.png", None)
        record = {**self.params, "instruction": self.instruction, "parts": self.parts, "seed": self.seed,
                  "gains_per_step": self.gains, "notes": self.notes}
        sidecar = folder / "result.json"
        with atomic_path(sidecar) as temp:
            temp.write_text(json.dumps(record, indent=2, default=str))
        return written + [sidecar]


def instruction_parts(instruction: str, split_and: bool = False) -> list[str]:
    """The sub-instructions of `instruction` (separated by ",", ", and" or ";", and with
    `split_and` by a bare " and " too, as in a prompt), or one sentence naming what is wrong:
    empty, an empty part, more than MAX_PARTS parts."""
    from attention_processors.saas import split_instruction, validate_parts

    if not isinstance(instruction, str) or not instruction.strip():
        example = "'a red circle and a blue square'" if split_and else "'make the circle blue, and make the square red'"
        raise UserInputError(f"Please write {'a prompt' if split_and else 'an instruction'}, e.g. {example}.")
    text = instruction.strip()
    ranges = validate_parts(text, split_instruction(text, split_and=split_and))
    if len(ranges) > MAX_PARTS:
        raise UserInputError(f"The {'prompt' if split_and else 'instruction'} has {len(ranges)} parts; at most "
                             f"{MAX_PARTS} are supported.")
    return [text[a:b] for a, b in ranges]


def working_size(pipe, width: int, height: int) -> tuple[int, int]:
    """(width, height): the longer side becomes the model's native side, the aspect is kept, and
    both sides are rounded to the model's grid multiple (at least one multiple)."""
    backbone = backbones.of(pipe)
    multiple = backbone.grid_multiple(pipe)
    native = max(models.default_size(pipe))
    scale = native / max(width, height)

    def side(value: int) -> int:
        return max(multiple, int(round(value * scale / multiple)) * multiple)

    return side(width), side(height)


def _resolve(pipe, settings: InstructSettings) -> dict:
    defaults = models.generation_defaults(pipe)
    return {
        "steps": settings.steps or defaults["steps"],
        "guidance": settings.guidance if settings.guidance is not None else defaults["guidance"],
        "image_guidance": (settings.image_guidance if settings.image_guidance is not None
                           else defaults.get("image_guidance", 1.5)),
    }


@models.one_call_at_a_time
def _call(pipe, controller=None, **kwargs) -> Image.Image:
    """One image from the pipeline, with `controller` attached to its denoiser for this call only."""
    from attention_processors.core import attach

    if controller is None:
        return pipe(**kwargs, output_type="pil").images[0]
    with attach(models.denoiser(pipe), controller):
        return pipe(**kwargs, output_type="pil").images[0]


def _sample(pipe, image: Image.Image, instruction: str, seed: int, run: dict, controller=None) -> Image.Image:
    return _call(pipe, controller, prompt=instruction, image=image, num_inference_steps=run["steps"],
                 guidance_scale=run["guidance"], image_guidance_scale=run["image_guidance"],
                 generator=torch.Generator().manual_seed(seed))


def edit_by_instruction(
    pipe,
    image,
    instruction: str,
    settings: InstructSettings | None = None,
    seed: int | None = None,
    compare: bool = True,
    **options,
) -> InstructResult:
    """Edit `image` (path, PIL image or array) by `instruction`, with SaaS unless `saas=False`.

    settings: `InstructSettings` (defaults: SaaS's window and scale, our gain rule); `options`
    override its fields by name (`saas=False`, `window=0.5`).  compare: also sample plainly
    with the same seed (the baseline the tab shows side by side).  seed None or negative draws
    one, reported in the result.
    """
    backbones.require(pipe, SUPPORTED, TASK)
    settings = (settings or INSTRUCT).replace(**options).validated()
    parts = instruction_parts(instruction)
    instruction = instruction.strip()
    check_fits(pipe.tokenizer, instruction, pipe.tokenizer.model_max_length, "instruction")
    source = load_image(image, "image")
    width, height = working_size(pipe, *source.size)
    source = source.resize((width, height), Image.BICUBIC) if source.size != (width, height) else source
    seed = resolve_seed(seed)
    run = _resolve(pipe, settings)
    pipe = models.view(pipe)  # this call's own progress and call attributes
    notes = []
    if len(parts) == 1 and settings.saas:
        notes.append("The instruction has one part, so SaaS has no other part to balance it against: "
                     "its result equals plain sampling.")
    plain = _sample(pipe, source, instruction, seed, run) if (compare or not settings.saas) else None
    masks, gains, recorded = [], [], []
    if settings.saas and len(parts) == 1 and plain is not None:
        # one part: every gain is 1, so SaaS runs the stock path and its result is `plain` bit for
        # bit (tests/test_saas_attention.py); sampling it again would only double the time
        edited = plain
    elif settings.saas:
        from attention_processors.saas import clip_spans, split_instruction

        roles = backbones.of(pipe).row_roles(pipe, run["guidance"], run["image_guidance"])
        spans = clip_spans(pipe.tokenizer, instruction, split_instruction(instruction))
        controller = _controller(pipe, spans, roles, run["steps"], settings)
        edited = _sample(pipe, source, instruction, seed, run, controller)
        recorded, masks, gains = _rescaled_steps(controller)
    else:
        edited = plain
        plain = None
    params = {"model": models.model_name(pipe), "task": "instruct", **run, "saas": settings.saas, "window": settings.window,
              "scale": settings.scale, "gain": settings.gain, "max_gain": settings.max_gain,
              "mask_threshold": settings.mask_threshold, "width": width, "height": height, "saas_steps": recorded}
    return InstructResult(source=source, edited=edited, plain=plain, instruction=instruction, parts=parts, seed=seed,
                          masks=masks, gains=gains, params=params, notes=notes)


def _generate(pipe, prompt: str, seed: int, run: dict, controller=None) -> Image.Image:
    return _call(pipe, controller, prompt=prompt, num_inference_steps=run["steps"], guidance_scale=run["guidance"],
                 height=run["height"], width=run["width"], generator=torch.Generator().manual_seed(seed),
                 **backbones.of(pipe).call_defaults(pipe))


def generate_by_parts(
    pipe,
    prompt: str,
    settings: InstructSettings | None = None,
    seed: int | None = None,
    compare: bool = True,
    width: int | None = None,
    height: int | None = None,
    **options,
) -> InstructResult:
    """Text to image from a prompt of parts ("a red circle, a blue square and a green triangle on
    a striped background") with SaaS balancing the parts, on an SD 1.x/2.x model: our
    extrapolation (spec section 7, docs/methods/instruction.md), a gradient-free cousin of
    Attend-and-Excite.  The parts are split at ",", ";" and " and "; the rows edited are the
    conditional ones of classifier-free guidance; the gain rule is the settings' (`equalize`
    by default).  `compare`: also generate plainly with the same seed.  The result's `source` is
    None (there is no input image): its masks are shown over the SaaS image.
    """
    backbones.require(pipe, T2I_SUPPORTED, T2I_TASK)
    settings = (settings or INSTRUCT).replace(**options).validated()
    parts = instruction_parts(prompt, split_and=True)
    prompt = prompt.strip()
    check_fits(pipe.tokenizer, prompt, pipe.tokenizer.model_max_length, "prompt")
    native_height, native_width = models.default_size(pipe)
    height, width = int(height or native_height), int(width or native_width)
    models.check_size(pipe, height, width)
    seed = resolve_seed(seed)
    defaults = models.generation_defaults(pipe)
    run = {"steps": settings.steps or defaults["steps"],
           "guidance": settings.guidance if settings.guidance is not None else defaults["guidance"],
           "height": height, "width": width}
    pipe = models.view(pipe)
    notes = []
    if len(parts) == 1 and settings.saas:
        notes.append("The prompt has one part, so SaaS has no other part to balance it against: "
                     "its result equals plain generation.")
    plain = _generate(pipe, prompt, seed, run) if (compare or not settings.saas or len(parts) == 1) else None
    masks, gains, recorded = [], [], []
    if settings.saas and len(parts) > 1:
        from attention_processors.saas import clip_spans, split_instruction

        roles = backbones.of(pipe).row_roles(pipe, run["guidance"])  # ("cond",) alone at guidance 1
        spans = clip_spans(pipe.tokenizer, prompt, split_instruction(prompt, split_and=True))
        controller = _controller(pipe, spans, roles, run["steps"], settings)
        edited = _generate(pipe, prompt, seed, run, controller)
        recorded, masks, gains = _rescaled_steps(controller)
        if not compare:
            plain = None
    elif settings.saas:  # one part: every gain is 1, the stock path bit for bit; no second sampling
        edited = plain
        if not compare:
            plain = None
    else:
        edited, plain = plain, None
    params = {"model": models.model_name(pipe), "task": "parts", **run, "saas": settings.saas,
              "window": settings.window, "scale": settings.scale, "gain": settings.gain,
              "max_gain": settings.max_gain, "mask_threshold": settings.mask_threshold, "saas_steps": recorded}
    return InstructResult(source=None, edited=edited, plain=plain, instruction=prompt, parts=parts, seed=seed,
                          masks=masks, gains=gains, params=params, notes=notes)


def _rescaled_steps(controller) -> tuple[list[int], list[np.ndarray], list[list[float]]]:
    """(steps, masks, gains) of every step SaaS rescaled, from the controller's history: entry i
    holds the masks and gains measured at step i, which step i + 1 rescales with."""
    steps, masks, gains = [], [], []
    for entry in controller.history:
        if bool(entry["active"][0].any()):
            steps.append(int(entry["step"]) + 1)
            masks.append(entry["masks"][0].numpy().astype(bool))
            gains.append([float(g) for g in entry["gains"][0]])
    return steps, masks, gains


def _controller(pipe, spans, roles, steps: int, settings: InstructSettings):
    """SaaS on the instruction row's cross-attention (ours for SD-family models, spec section 6):
    masks measured at steps 0..thre-1 rescale steps 1..thre, thre = ceil(window * steps)."""
    from attention_processors.core import ControlState, attention_layer_names
    from attention_processors.saas import SaaSController, sd_layers, sd_window

    unet = models.denoiser(pipe)
    layers = sd_layers(attention_layer_names(unet), backbones.of(pipe).unet_depth(unet))
    fixed = settings.gain == "fixed"
    return SaaSController(
        spans, layers, window=sd_window(steps, settings.window), scale=settings.scale, gain_mode=settings.gain,
        g_max=settings.max_gain, gain=settings.max_gain if fixed else None,
        mask_threshold="auto" if settings.mask_threshold is None else settings.mask_threshold,
        rows=("cond",), state=ControlState(row_roles=roles),
    )
