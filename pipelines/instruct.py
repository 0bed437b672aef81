"""Instruction edit: an image and a multi-part instruction ("make the circle blue, and make the
background beige") edited by an OmniGen, FLUX Kontext or InstructPix2Pix model, with SaaS (self-adaptive
attention scaling; ICCV 2025) so that no part of the instruction is neglected.

    from pipelines import models
    from pipelines.instruct import edit_by_instruction

    pipe = models.load("builtin-edit")      # or "Shitao/OmniGen-v1-diffusers", "tiny-omnigen", "tiny-flux-kontext"
    result = edit_by_instruction(pipe, "scene.png", "make the circle blue, and make the square red", seed=0)
    result.edited, result.plain        # SaaS and plain sampling with the same seed
    result.save("out/")                # edited.png, plain.png, masks, result.json

- **OmniGen** (`backbones.OMNIGEN`, the paper's backbone; docs/methods/instruction.md, spec
  sections 2-5): the input image is attention tokens of the one sequence, and they out-compete the
  text.  The prompt is OmniGen's edit form `<img><|image_1|></img> INSTRUCTION`; each part's token
  span is found from character offsets in the exact text OmniGen's processor tokenizes
  (`OmniGen.instruction_layout`); `attention_processors.saas.install_omnigen` measures and
  rescales the cond row's output-image queries in the paper's layers, window and gain rule.
- **FLUX Kontext** (`backbones.FLUX_KONTEXT`; OUR EXTRAPOLATION, not the paper's;
  docs/methods/instruction.md, "FLUX Kontext"): the joint sequence is [T5 text, noisy latents,
  reference-image latents], and the reference tokens play the paper's input-image role (the
  competitor of its gain rule).  Each part's span is found from the T5 tokenizer's character
  offsets (`FluxKontext.instruction_layout`); `attention_processors.saas.install_flux_kontext`
  measures and rescales the output-image queries in the last three quarters of the dual- and
  single-stream blocks (`flux_kontext_saas_layers`), with the paper's window and gain rule.
- **InstructPix2Pix** (and our `builtin-edit`) takes the image by channel concatenation, so on
  these models SaaS is our extrapolation (spec section 6): each part's cross-attention map in the
  instruction row gives a mask (blur, min-max, Otsu), and inside its mask the part's attention is
  boosted by a gain that equalises the parts' attention (capped at `max_gain`), measured on the
  previous step.

The attention mechanism is `attention_processors/saas.py`; this module validates the inputs, runs
the pipeline twice with one seed (SaaS and plain, the baseline), and returns what it saw: the masks
and gains per step.  Each supported backbone has one edit object here, in `_EDITS` (keyed by the
backbone): how to call its pipeline and how to put SaaS on it; nothing else compares families.

Sizes: the image is resized (aspect kept) so that its longer side is the model's working side
(InstructPix2Pix and FLUX Kontext: its native side; OmniGen: the paper's 512 px, or a smaller model's
native side),
rounded to the model's grid multiple; the result has that working size.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import backbones, models
from .errors import UserInputError
from .instruct_settings import INSTRUCT, MAX_PARTS, InstructSettings, gain_rule
from .io import atomic_path, load_image, save_image
from .seeds import resolve_seed
from .tokenizers import check_fits

__all__ = ["InstructResult", "edit_by_instruction", "edit_for", "edit_run", "flux_kontext_saas_layers", "generate_by_parts",
           "instruction_parts", "omnigen_saas_layers", "saas_changes_nothing", "working_size"]

TASK = "Instruction edit"
#: multi-part text-to-image (spec section 7): SD 1.x/2.x and SDXL UNets, whose attn2 levels
#: `sd_layers` knows.  SDXL's two CLIP encoders are concatenated per token over the same 77
#: positions (their tokenizers share CLIP's BPE), so the first tokenizer's spans hold for both.
T2I_SUPPORTED = (backbones.SD, backbones.SDXL)
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
    """(width, height): the longer side becomes the model's working side (the `native_side` of
    its entry in `_EDITS`; a model this task does not edit with: its native side), the aspect is
    kept, and both sides are rounded to the model's grid multiple (at least one multiple)."""
    backbone = backbones.of(pipe)
    multiple = backbone.grid_multiple(pipe)
    edit = _EDITS.get(backbone)
    native = edit.native_side(pipe) if edit is not None else max(models.default_size(pipe))
    scale = native / max(width, height)

    def side(value: int) -> int:
        return max(multiple, int(round(value * scale / multiple)) * multiple)

    return side(width), side(height)


def edit_run(pipe, settings: InstructSettings) -> dict:
    """What one edit with `settings` runs on this (supported) model: steps, guidance, image
    guidance (None in `settings`: the model's; always None on a model without image guidance,
    FLUX Kontext) and the gain rule ("auto" resolved, `gain_rule`)."""
    edit = _EDITS[backbones.require(pipe, SUPPORTED, TASK)]
    defaults = edit.defaults(pipe)
    image_guidance = defaults["image_guidance"]
    if image_guidance is not None and settings.image_guidance is not None:
        image_guidance = settings.image_guidance
    return {
        "steps": settings.steps or defaults["steps"],
        "guidance": settings.guidance if settings.guidance is not None else defaults["guidance"],
        "image_guidance": image_guidance,
        "gain": gain_rule(settings, edit.image_tokens),
    }


def saas_changes_nothing(settings: InstructSettings, n_parts: int, rule: str) -> bool:
    """Whether SaaS is known to give plain sampling's result bit for bit, so that sampling it
    again would only double the time: one part under the `equalize` rule at scale 1 (its gain is
    always 1, so the stock attention runs; tests/test_saas_attention.py).  Every other rule can
    boost a single part: `fixed` by its gain, the ratios against their competitor (OmniGen's
    image tokens, SD's start token)."""
    return settings.saas and n_parts == 1 and rule == "equalize" and settings.scale == 1


@models.one_call_at_a_time
def _call(pipe, controller=None, **kwargs) -> Image.Image:
    """One image from the pipeline, with `controller` attached to its denoiser for this call only."""
    from attention_processors.core import attach

    if controller is None:
        return pipe(**kwargs, output_type="pil").images[0]
    with attach(models.denoiser(pipe), controller):
        return pipe(**kwargs, output_type="pil").images[0]


class _InstructPix2PixEdit:
    """diffusers' `StableDiffusionInstructPix2PixPipeline` (and `builtin-edit`): SaaS on the
    instruction row's ``attn2`` (ours, spec section 6, `_controller`)."""

    image_tokens = False  # the image enters by channel concatenation: no image tokens to compete with

    def defaults(self, pipe) -> dict:
        defaults = models.generation_defaults(pipe)
        return {"steps": defaults["steps"], "guidance": defaults["guidance"],
                "image_guidance": defaults.get("image_guidance", 1.5)}

    def native_side(self, pipe) -> int:
        return max(models.default_size(pipe))

    def check_instruction(self, pipe, instruction: str) -> None:
        check_fits(pipe.tokenizer, instruction, pipe.tokenizer.model_max_length, "instruction")

    def prepare(self, pipe, source: Image.Image, instruction: str, run: dict) -> dict:
        """The pipeline's keyword arguments for this edit (everything but the generator)."""
        return dict(prompt=instruction, image=source, num_inference_steps=run["steps"],
                    guidance_scale=run["guidance"], image_guidance_scale=run["image_guidance"])

    def sample(self, pipe, call: dict, seed: int, run: dict, settings: InstructSettings | None = None):
        """(image, SaaS history): plain sampling, or with `settings` SaaS (history: one entry per captured step)."""
        controller = None
        if settings is not None:
            from attention_processors.saas import clip_spans, split_instruction

            instruction = call["prompt"]
            roles = backbones.of(pipe).row_roles(pipe, run["guidance"], run["image_guidance"])
            spans = clip_spans(pipe.tokenizer, instruction, split_instruction(instruction))
            controller = _controller(pipe, spans, roles, run["steps"], settings, run["gain"])
        image = _call(pipe, controller, **call, generator=torch.Generator().manual_seed(seed))
        return image, (controller.history if controller is not None else [])


#: the paper's OmniGen v1 has 32 layers; SaaS captures and rescales in its layers 8-31
_OMNIGEN_V1_LAYERS = 32


def omnigen_saas_layers(num_layers: int, paper_layers: tuple[int, ...]) -> tuple[int, ...]:
    """The paper's layer set (8-31 of OmniGen v1's 32) for a transformer of `num_layers`: the
    same layers on a 32-layer model, the same last three quarters on another (ours; the tiny
    4-layer model: 1-3)."""
    first = num_layers * min(paper_layers) // _OMNIGEN_V1_LAYERS
    return tuple(range(first, num_layers))


class _JointSequenceEdit:
    """What OmniGen and FLUX Kontext share: text and images are tokens of one attention sequence,
    and SaaS is a per-call state (`saas_state`) bound into processors that `install` puts on the
    transformer for one call and restores after it (also on an error or a stop)."""

    def seeded(self, pipe, seed: int):
        """Extra seeding around the call (none: the generator is enough)."""
        return nullcontext()

    def sample(self, pipe, call: dict, seed: int, run: dict, settings: InstructSettings | None = None):
        """(image, SaaS history), as `_InstructPix2PixEdit.sample`."""
        kwargs = {key: value for key, value in call.items() if key != "layout"}
        with models.exclusive(pipe), self.seeded(pipe, seed):
            generator = torch.Generator().manual_seed(seed)
            if settings is None:
                return pipe(**kwargs, generator=generator, output_type="pil").images[0], []
            state = self.saas_state(pipe, call["layout"], run, settings)
            with self.install(pipe.transformer, state):
                image = pipe(**kwargs, generator=generator, output_type="pil").images[0]
            return image, state.history


class _OmniGenEdit(_JointSequenceEdit):
    """diffusers' `OmniGenPipeline`, the paper's backbone: SaaS as the paper runs it (spec
    sections 2-5) on the cond row's output-image queries, with the paper's settings (layers 8-31,
    the window 20 of 50, scale 1, Otsu, the image-token gain) taken from `InstructSettings`."""

    image_tokens = True  # the input image is tokens of the one attention sequence: the paper's competitor

    def defaults(self, pipe) -> dict:
        # OmniGenPipeline's own call defaults, which are the paper's sampling settings
        from attention_processors.saas import PAPER_DEFAULTS

        return {"steps": PAPER_DEFAULTS.steps, "guidance": PAPER_DEFAULTS.guidance_scale,
                "image_guidance": PAPER_DEFAULTS.img_guidance_scale}

    def native_side(self, pipe) -> int:
        """The paper's 512 px, or less where the model's native side (tiny-omnigen: 64 px) or its
        position table is smaller."""
        from attention_processors.saas import PAPER_DEFAULTS

        return min(PAPER_DEFAULTS.size, max(models.default_size(pipe)), backbones.OMNIGEN.max_side(pipe))

    def check_instruction(self, pipe, instruction: str) -> None:
        backbones.OMNIGEN.check_text(instruction, "instruction")

    def prepare(self, pipe, source: Image.Image, instruction: str, run: dict) -> dict:
        """The pipeline's keyword arguments, and the cond row's layout: where each part's tokens
        are, measured on the pipeline's own processor (which also checks the sequence's length)."""
        from attention_processors.saas import split_instruction

        omnigen = backbones.OMNIGEN
        call = omnigen.edit_kwargs(source, instruction, *source.size)
        at = len(omnigen.edit_prompt(""))  # where the instruction starts in the prompt
        ranges = [(a + at, b + at) for a, b in split_instruction(instruction)]
        with models.exclusive(pipe):  # the processor is shared by every view of the model
            layout = omnigen.instruction_layout(pipe, call, ranges)
        omnigen.check_sequence(pipe, layout)
        return {**call, "num_inference_steps": run["steps"], "guidance_scale": run["guidance"],
                "img_guidance_scale": run["image_guidance"], "layout": layout}

    def seeded(self, pipe, seed: int):
        """The same seed also seeds the global RNG, which OmniGen's pipeline encodes the input
        image with."""
        return backbones.OMNIGEN.seeded(pipe, seed)

    @staticmethod
    def install(transformer, state):
        from attention_processors.saas import install_omnigen

        return install_omnigen(transformer, state)

    @staticmethod
    def saas_state(pipe, layout, run: dict, settings: InstructSettings):
        """The per-call SaaS state: the paper's layers for this transformer (`omnigen_saas_layers`),
        the window `settings.window` of the steps (0.4: the paper's 20 of 50), the gain rule of
        `run` (the paper's has no cap), the cond row of the pipeline's three."""
        from attention_processors.saas import PAPER_DEFAULTS, SaaSOmniGenState, sd_window

        num_layers = len(pipe.transformer.layers)
        rule = run["gain"]
        return SaaSOmniGenState(
            layout.spans,
            capture_layers=omnigen_saas_layers(num_layers, PAPER_DEFAULTS.capture_layers),
            scale_layers=omnigen_saas_layers(num_layers, PAPER_DEFAULTS.scale_layers),
            window=sd_window(run["steps"], settings.window),  # the same rule: rescale at steps 1..ceil(w T)
            scale=settings.scale, gain_mode=rule, g_max=None if rule == "paper" else settings.max_gain,
            gain=settings.max_gain if rule == "fixed" else None,
            mask_threshold="auto" if settings.mask_threshold is None else settings.mask_threshold,
            row_roles=backbones.OMNIGEN.row_roles(pipe, run["guidance"], run["image_guidance"]),
            seq_len=layout.seq_len,
        )


def flux_kontext_saas_layers(transformer, paper_layers: tuple[int, ...]) -> tuple[int, ...]:
    """The layers SaaS captures and rescales on a FLUX Kontext transformer (ours): the paper's
    share of OmniGen v1's depth (layers 8-31 of 32: the last three quarters) of the attention
    layers in execution order (`saas.flux_attention_modules`: dual-stream blocks, then
    single-stream ones).  FLUX.1's 19 + 38 blocks: layers 14-56, i.e. dual-stream blocks 14-18 and
    every single-stream block; the tiny model's 1 + 1: both."""
    from attention_processors.saas import flux_attention_modules

    return omnigen_saas_layers(len(flux_attention_modules(transformer)), paper_layers)


class _FluxKontextEdit(_JointSequenceEdit):
    """diffusers' `FluxKontextPipeline`: SaaS as the paper runs it on OmniGen, carried over to FLUX
    Kontext by us (OUR EXTRAPOLATION; docs/methods/instruction.md, "FLUX Kontext").  Kontext's
    joint sequence is [T5 text, noisy latents, reference-image latents]; the reference tokens play
    the paper's input-image role, so the gain rule "auto" is the paper's with them as the
    competitor.  Layers: `flux_kontext_saas_layers`; window, scale, Otsu and gain from
    `InstructSettings`; sampling: the pipeline's own defaults (28 steps, guidance embedding 3.5),
    one cond row, no image guidance."""

    image_tokens = True  # the reference image is tokens of the joint sequence: the competitor

    def defaults(self, pipe) -> dict:
        """The pipeline's own call defaults (steps, embedded guidance); Kontext has no image guidance."""
        import inspect

        parameters = inspect.signature(type(pipe).__call__).parameters
        return {"steps": int(parameters["num_inference_steps"].default),
                "guidance": float(parameters["guidance_scale"].default), "image_guidance": None}

    def native_side(self, pipe) -> int:
        return max(models.default_size(pipe))

    def check_instruction(self, pipe, instruction: str) -> None:
        # the T5 window: the pipeline would cut a longer prompt silently (with a log warning)
        check_fits(pipe.tokenizer_2, instruction, backbones.FLUX_KONTEXT.text_length(pipe), "instruction")

    def prepare(self, pipe, source: Image.Image, instruction: str, run: dict) -> dict:
        """The pipeline's keyword arguments, and the joint sequence's layout (the parts' spans in
        the T5 text, the output and reference images' token ranges)."""
        from attention_processors.saas import split_instruction

        kontext = backbones.FLUX_KONTEXT
        call = {**kontext.edit_kwargs(source, instruction, *source.size), "num_inference_steps": run["steps"],
                "guidance_scale": run["guidance"], "max_sequence_length": kontext.text_length(pipe)}
        layout = kontext.instruction_layout(pipe, call, split_instruction(instruction))
        return {**call, "layout": layout}

    @staticmethod
    def install(transformer, state):
        from attention_processors.saas import install_flux_kontext

        return install_flux_kontext(transformer, state)

    @staticmethod
    def saas_state(pipe, layout, run: dict, settings: InstructSettings):
        """The per-call SaaS state: `flux_kontext_saas_layers`, the window `settings.window` of the
        steps, the gain rule of `run` (the paper's: no cap), the pipeline's one cond row."""
        from attention_processors.saas import PAPER_DEFAULTS, SaaSFluxKontextState, sd_window

        rule = run["gain"]
        return SaaSFluxKontextState(
            layout.spans,
            capture_layers=flux_kontext_saas_layers(pipe.transformer, PAPER_DEFAULTS.capture_layers),
            scale_layers=flux_kontext_saas_layers(pipe.transformer, PAPER_DEFAULTS.scale_layers),
            window=sd_window(run["steps"], settings.window),
            scale=settings.scale, gain_mode=rule, g_max=None if rule == "paper" else settings.max_gain,
            gain=settings.max_gain if rule == "fixed" else None,
            mask_threshold="auto" if settings.mask_threshold is None else settings.mask_threshold,
            row_roles=backbones.FLUX_KONTEXT.row_roles(pipe, run["guidance"]),
            seq_len=layout.seq_len,
        )


#: how this task edits on each backbone it supports
_EDITS = {backbones.INSTRUCT_PIX2PIX: _InstructPix2PixEdit(), backbones.OMNIGEN: _OmniGenEdit(),
          backbones.FLUX_KONTEXT: _FluxKontextEdit()}
SUPPORTED = tuple(_EDITS)


def edit_for(pipe):
    """How this task edits with `pipe`'s backbone: `prepare(pipe, source, instruction, run)` gives
    the pipeline's call, `sample(pipe, call, seed, run, settings=None)` runs it plainly or with
    SaaS (benchmarks/bench_instruct.py times the two); UserInputError for another family."""
    return _EDITS[backbones.require(pipe, SUPPORTED, TASK)]


@models.one_call_at_a_time
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

    settings: `InstructSettings` (defaults: SaaS's window and scale, the model's gain rule);
    `options` override its fields by name (`saas=False`, `window=0.5`).  compare: also sample
    plainly with the same seed (the baseline the tab shows side by side).  seed None or negative
    draws one, reported in the result.
    """
    edit = edit_for(pipe)
    settings = (settings or INSTRUCT).replace(**options).validated()
    parts = instruction_parts(instruction)
    instruction = instruction.strip()
    edit.check_instruction(pipe, instruction)
    source = load_image(image, "image")
    width, height = working_size(pipe, *source.size)
    source = source.resize((width, height), Image.BICUBIC) if source.size != (width, height) else source
    seed = resolve_seed(seed)
    run = edit_run(pipe, settings)
    pipe = models.view(pipe)  # this call's own progress and call attributes
    call = edit.prepare(pipe, source, instruction, run)
    notes = []
    no_op = saas_changes_nothing(settings, len(parts), run["gain"])
    if no_op:
        notes.append("The instruction has one part, so SaaS has no other part to balance it against: "
                     "its result equals plain sampling.")
    plain = edit.sample(pipe, call, seed, run)[0] if (compare or not settings.saas) else None
    masks, gains, recorded = [], [], []
    if no_op and plain is not None:
        # sampling it again would only double the time (`saas_changes_nothing`)
        edited = plain
    elif settings.saas:
        edited, history = edit.sample(pipe, call, seed, run, settings)
        recorded, masks, gains = _rescaled_steps(history)
    else:
        edited = plain
        plain = None
    params = {"model": models.model_name(pipe), "task": "instruct", **run, "saas": settings.saas,
              "window": settings.window, "scale": settings.scale, "max_gain": settings.max_gain,
              "mask_threshold": settings.mask_threshold, "width": width, "height": height, "saas_steps": recorded}
    return InstructResult(source=source, edited=edited, plain=plain, instruction=instruction, parts=parts, seed=seed,
                          masks=masks, gains=gains, params=params, notes=notes)


def _generate(pipe, prompt: str, seed: int, run: dict, controller=None) -> Image.Image:
    return _call(pipe, controller, prompt=prompt, num_inference_steps=run["steps"], guidance_scale=run["guidance"],
                 height=run["height"], width=run["width"], generator=torch.Generator().manual_seed(seed),
                 **backbones.of(pipe).call_defaults(pipe))


@models.one_call_at_a_time
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
    a striped background") with SaaS balancing the parts, on an SD 1.x/2.x or SDXL model: our
    extrapolation (spec section 7, docs/methods/instruction.md), a gradient-free cousin of
    Attend-and-Excite.  The parts are split at ",", ";" and " and "; the rows edited are the
    conditional ones of classifier-free guidance; the gain rule is the settings' ("auto":
    `equalize`).  `compare`: also generate plainly with the same seed.  The result's `source` is
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
           "height": height, "width": width, "gain": gain_rule(settings, image_tokens=False)}
    pipe = models.view(pipe)
    notes = []
    no_op = saas_changes_nothing(settings, len(parts), run["gain"])
    if no_op:
        notes.append("The prompt has one part, so SaaS has no other part to balance it against: "
                     "its result equals plain generation.")
    plain = _generate(pipe, prompt, seed, run) if (compare or not settings.saas or no_op) else None
    masks, gains, recorded = [], [], []
    if settings.saas and not no_op:
        from attention_processors.saas import clip_spans, split_instruction

        roles = backbones.of(pipe).row_roles(pipe, run["guidance"])  # ("cond",) alone at guidance 1
        spans = clip_spans(pipe.tokenizer, prompt, split_instruction(prompt, split_and=True))
        controller = _controller(pipe, spans, roles, run["steps"], settings, run["gain"])
        edited = _generate(pipe, prompt, seed, run, controller)
        recorded, masks, gains = _rescaled_steps(controller.history)
        if not compare:
            plain = None
    elif settings.saas:  # `saas_changes_nothing`: the stock path bit for bit; no second sampling
        edited = plain
        if not compare:
            plain = None
    else:
        edited, plain = plain, None
    params = {"model": models.model_name(pipe), "task": "parts", **run, "saas": settings.saas,
              "window": settings.window, "scale": settings.scale, "max_gain": settings.max_gain,
              "mask_threshold": settings.mask_threshold, "saas_steps": recorded}
    return InstructResult(source=None, edited=edited, plain=plain, instruction=prompt, parts=parts, seed=seed,
                          masks=masks, gains=gains, params=params, notes=notes)


def _rescaled_steps(history: list[dict]) -> tuple[list[int], list[np.ndarray], list[list[float]]]:
    """(steps, masks, gains) of every step SaaS rescaled, from the SaaS loop's history (both
    families keep the same one): entry i holds the masks and gains measured at step i, which step
    i + 1 rescales with; row 0 is the one measured row (the cond row)."""
    steps, masks, gains = [], [], []
    for entry in history:
        if bool(entry["active"][0].any()):
            steps.append(int(entry["step"]) + 1)
            masks.append(entry["masks"][0].numpy().astype(bool))
            gains.append([float(g) for g in entry["gains"][0]])
    return steps, masks, gains


def _controller(pipe, spans, roles, steps: int, settings: InstructSettings, rule: str):
    """SaaS on the instruction row's cross-attention (ours for SD-family models, spec section 6):
    masks measured at steps 0..thre-1 rescale steps 1..thre, thre = ceil(window * steps); `rule`:
    the gain rule (`gain_rule`, "auto" resolved)."""
    from attention_processors.core import ControlState, attention_layer_names
    from attention_processors.saas import SaaSController, default_levels, sd_layers, sd_window

    unet = models.denoiser(pipe)
    names, depth = attention_layer_names(unet), backbones.of(pipe).unet_depth(unet)
    levels = default_levels(names, depth)
    fixed = rule == "fixed"
    # map_level: the finest captured level's grid is the mask grid, known before the first step
    # (what a compiled denoiser needs, `--compile`)
    return SaaSController(
        spans, sd_layers(names, depth, levels), window=sd_window(steps, settings.window), scale=settings.scale,
        gain_mode=rule, g_max=settings.max_gain, gain=settings.max_gain if fixed else None,
        mask_threshold="auto" if settings.mask_threshold is None else settings.mask_threshold,
        rows=("cond",), map_level=min(levels), state=ControlState(row_roles=roles),
    )
