"""FLUX.1 Kontext (diffusers `FluxKontextPipeline`): FLUX.1's transformer, dual + single stream,
editing a reference image by an instruction.  Used by the Instruction edit task only, where SaaS
on it is OUR EXTRAPOLATION of the paper (docs/methods/instruction.md, "FLUX Kontext").

What this module knows about the family:

- **Detection.** Kontext's transformer is a `FluxTransformer2DModel` exactly like FLUX.1's, so the
  denoiser cannot tell the two apart: the pipeline class does (`matches_pipeline`), and
  `backbones.of` asks it before the denoiser-based families.  A `FluxPipeline.from_pipe` of a
  Kontext model is FLUX (text to image) again.
- **Sequence layout** (`FluxKontextPipeline.__call__` and `prepare_latents`, diffusers 0.42): every
  attention layer sees [T5 text (`max_sequence_length` tokens, padded; position ids all 0), the
  noisy latents (the output image, (H/16)(W/16) packed 2x2 patches, ids (0, row, col)), the
  reference image's latents (ids (1, row, col))].  Dual-stream blocks concatenate text and image
  inside the attention, single-stream blocks before it: the order is the same.  The CLIP prompt
  is pooled only, so it holds no keys.
- **Rows.** Guidance is an embedding: one cond row.  True CFG (`true_cfg_scale` > 1 with a
  negative prompt) would be a second transformer call per step; the task never asks for it.
- **Sizes.** Sides are multiples of 16 (VAE /8, 2x2 packing).  The pipeline snaps the output size
  to `max_area` and, with `_auto_resize`, the reference image to one of Kontext's preferred
  resolutions; `edit_kwargs` turns both off so that the output and the reference keep the size
  asked for (the task already put them on the grid).
- **Randomness.** The reference image is encoded with the latent distribution's mode, so the
  generator alone decides the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .flux import Flux


@dataclass(frozen=True)
class KontextLayout:
    """Where things are in the joint sequence of one FLUX Kontext call (what the transformer sees).

    spans: token positions of each requested character range of the prompt (in the T5 text,
        which starts the sequence).
    text_tokens: the T5 length (the pipeline pads to `max_sequence_length`).
    out_grid: the output image's token grid (h, w); its tokens follow the text.
    reference: the reference image's token positions (after the output image's).
    seq_len: the length of the joint sequence.
    """

    spans: list[slice]
    text_tokens: int
    out_grid: tuple[int, int]
    reference: slice
    seq_len: int

    @property
    def output(self) -> slice:
        """The output image's token positions."""
        return slice(self.text_tokens, self.text_tokens + self.out_grid[0] * self.out_grid[1])


class FluxKontext(Flux):
    name = "flux-kontext"
    label = "FLUX Kontext MMDiT"
    short = "FLUX Kontext"
    pipeline_classes = ("FluxKontextPipeline",)
    text_to_image = False  # it edits a reference image; only the Instruction edit task runs it

    def matches(self, denoiser) -> bool:
        # FLUX.1's transformer: the denoiser alone never says Kontext (see `matches_pipeline`)
        return False

    def matches_pipeline(self, pipe) -> bool:
        """Whether `pipe` is a FLUX Kontext pipeline (its class, with a FLUX transformer)."""
        return type(pipe).__name__ in self.pipeline_classes and super().matches(getattr(pipe, "transformer", None))

    # ------------------------------------------------------------------ calling the pipeline

    def row_roles(self, pipe, guidance: float, image_guidance: float | None = None) -> tuple[str, ...]:
        """One cond row: guidance is an embedding (no CFG batch; true CFG is not used)."""
        return ("cond",)

    def text_length(self, pipe) -> int:
        """The T5 tokens the pipeline pads the prompt to (its `max_sequence_length` default, 512)."""
        import inspect

        return int(inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default)

    def edit_kwargs(self, image, instruction: str, width: int, height: int) -> dict:
        """`pipe(...)` keyword arguments that edit `image` by `instruction` into a width x height
        result, both on the 16 px grid already: `max_area` is the output's own area (so the
        pipeline keeps the size) and `_auto_resize` is off (so the reference keeps its size)."""
        return dict(image=image, prompt=instruction, width=width, height=height, max_area=width * height,
                    _auto_resize=False)

    # ------------------------------------------------------------------ the sequence

    def instruction_layout(self, pipe, call: dict, ranges: Sequence[tuple[int, int]]) -> KontextLayout:
        """Where each character range (start, end) of ``call["prompt"]`` lies in the joint
        sequence, and where the output and reference images are, for `edit_kwargs`' call with
        ``call["max_sequence_length"]`` T5 tokens.  The spans come from the T5 tokenizer's offsets
        checked against the ids the pipeline's own T5 encoding gives (`saas.offset_spans`)."""
        from attention_processors.saas import offset_spans

        tokenizer, prompt = pipe.tokenizer_2, call["prompt"]
        length = int(call["max_sequence_length"])
        # what FluxKontextPipeline._get_t5_prompt_embeds gives the encoder
        ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        spans = offset_spans(tokenizer, prompt, ranges, ids)
        factor = self.size_multiple(pipe)
        out_grid = (int(call["height"]) // factor, int(call["width"]) // factor)
        width, height = call["image"].size
        n_reference = (height // factor) * (width // factor)
        n_out = out_grid[0] * out_grid[1]
        reference = slice(length + n_out, length + n_out + n_reference)
        return KontextLayout(spans=spans, text_tokens=length, out_grid=out_grid, reference=reference,
                             seq_len=reference.stop)


FLUX_KONTEXT = FluxKontext()
