"""OmniGen v1 (diffusers `OmniGenPipeline`): one Phi-3-style transformer over a single sequence of
[chat-template text with the input images' VAE patch tokens spliced in, a time token, the output
image's patch tokens]; rectified flow; the paper's backbone for SaaS (docs/methods/instruction.md).

What this module knows about the family:

- **Sequence layout.** diffusers' `OmniGenMultiModalProcessor` wraps the prompt in a chat
  template (`<|user|>\\nGenerate an image according to the following instructions\\n` ... `<|end|>\\n
  <|assistant|>\\n<|diffusion|>`), splits it at the `<|image_N|>` tags, tokenizes each chunk with
  `text_tokenizer(chunk).input_ids` (dropping a leading id 1, the BOS, of every chunk but the
  first), and puts (h/16)(w/16) placeholder ids where each image goes.  The rows of the batch are
  left-padded to one length.  `instruction_layout` reruns that processor with the pipeline's own
  arguments and maps character ranges of the prompt to token positions in the cond row through the
  tokenizer's offset mapping, so no position is ever a fixed offset into one tokenizer's output.
- **Rows.** With an input image the pipeline batches [cond, uncond, img_cond] = (prompt + image,
  negative prompt alone, negative prompt + image) and always guides (it has no guidance-1 path).
- **Sizes.** Latents are /8 and patched 2x2: image sides are multiples of 16, and at most the
  transformer's position table (`pos_embed_max_size` patches) per side.
- **Randomness.** The pipeline encodes the input image with `latent_dist.sample()` and no
  generator, i.e. from torch's global RNG; `seeded` seeds that too, so one seed is one result.

- **torchvision.** diffusers builds `OmniGenPipeline.multimodal_processor` only where torchvision is
  installed, and uses it for four image transforms (crop, to-tensor, normalise).  This project does
  not require torchvision (CPU torch wheels and PyPI's torchvision wheels do not match), so where it
  is missing `provide_processor_transforms()` (run on import) gives diffusers' OmniGen modules the
  same four operations, computed as torchvision computes them; with torchvision it does nothing.

It is not a `text_to_image` backbone here even though OmniGen draws from text: this project's
text-to-image tasks program against `text_segments` / `encode_text`, which a single chat-template
sequence does not have, so only the Instruction edit task offers OmniGen models.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator, Sequence

import numpy as np
import torch
from diffusers import OmniGenTransformer2DModel

from pipelines.errors import UserInputError

from .base import Backbone

#: how OmniGen's documentation puts the first input image into an edit prompt
IMAGE_TAG = "<img><|image_1|></img>"
#: the image placeholders the multimodal processor splits the prompt at (its own pattern)
_IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")
#: the id the processor drops from the start of every chunk after the first (Phi-3's BOS)
_PROCESSOR_BOS_ID = 1


def _to_tensor(picture) -> torch.Tensor:
    """torchvision's `ToTensor` for a PIL RGB picture: (3, H, W) float32 in [0, 1]."""
    array = np.array(picture.convert("RGB"), dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)


class _Normalize:
    """torchvision's `Normalize`: (x - mean) / std per channel, in place when asked."""

    def __init__(self, mean, std, inplace: bool = False):
        self.mean, self.std, self.inplace = mean, std, inplace

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor if self.inplace else tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)


class _Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, value):
        for step in self.steps:
            value = step(value)
        return value


#: the part of `torchvision.transforms` that diffusers' OmniGen processor uses
PROCESSOR_TRANSFORMS = SimpleNamespace(Compose=_Compose, Lambda=lambda function: function, ToTensor=lambda: _to_tensor,
                                       Normalize=_Normalize)


def provide_processor_transforms() -> bool:
    """Where torchvision is not installed, let diffusers' `OmniGenPipeline` build its multimodal
    processor with `PROCESSOR_TRANSFORMS`; True when that was needed (idempotent)."""
    from diffusers.pipelines.omnigen import pipeline_omnigen, processor_omnigen
    from diffusers.utils import is_torchvision_available

    if is_torchvision_available():
        return False
    processor_omnigen.transforms = PROCESSOR_TRANSFORMS
    pipeline_omnigen.OmniGenMultiModalProcessor = processor_omnigen.OmniGenMultiModalProcessor
    return True


provide_processor_transforms()


@dataclass(frozen=True)
class OmniGenLayout:
    """Where things are in the cond row of one OmniGen call (padded positions, as the model sees them).

    spans: token positions of each requested character range of the prompt.
    input_images: token positions of each input image in the cond row.
    seq_len: the length L of the transformer's sequence (text + time token + output image).
    text_tokens: the cond row's own text and image-placeholder tokens (without padding).
    """

    spans: list[slice]
    input_images: list[slice]
    seq_len: int
    text_tokens: int


class OmniGen(Backbone):
    name = "omnigen"
    label = "OmniGen transformer"
    short = "OmniGen"
    pipeline_classes = ("OmniGenPipeline",)
    flow_matching = True
    text_to_image = False  # see the module docstring: only Instruction edit runs it

    def matches(self, denoiser) -> bool:
        return isinstance(denoiser, OmniGenTransformer2DModel)

    # ------------------------------------------------------------------ sizes

    def size_multiple(self, pipe) -> int:
        return self.vae_factor(pipe) * pipe.transformer.config.patch_size

    def max_side(self, pipe) -> int:
        """The largest image side the transformer's position table covers, in pixels."""
        config = pipe.transformer.config
        return config.pos_embed_max_size * config.patch_size * self.vae_factor(pipe)

    # ------------------------------------------------------------------ calling the pipeline

    def row_roles(self, pipe, guidance: float, image_guidance: float | None = None,
                  with_image: bool = True) -> tuple[str, ...]:
        """The pipeline's rows: ("cond", "uncond", "image") = [prompt + image, negative prompt,
        negative prompt + image] with an input image, else ("cond", "uncond").  OmniGen's pipeline
        batches them at every guidance scale."""
        return ("cond", "uncond", "image") if with_image else ("cond", "uncond")

    @staticmethod
    def edit_prompt(instruction: str) -> str:
        """The prompt that edits the first input image by `instruction` (OmniGen's documented form)."""
        return f"{IMAGE_TAG} {instruction}"

    def edit_kwargs(self, image, instruction: str, width: int, height: int) -> dict:
        """`pipe(...)` keyword arguments that edit `image` by `instruction` into a width x height
        result.  The input image keeps its size: it is already on the 16 px grid and the
        processor's size cap is set to its longer side, so the processor neither shrinks nor crops it."""
        return dict(prompt=self.edit_prompt(instruction), input_images=[image], width=width, height=height,
                    max_input_image_size=max(image.size))

    @contextmanager
    def seeded(self, pipe, seed: int) -> Iterator[None]:
        """Seed torch's global RNG (CPU and the pipeline's GPU) for one call and restore it after:
        the pipeline samples the input image's latents from it."""
        device = pipe._execution_device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    # ------------------------------------------------------------------ the sequence

    def check_text(self, text: str, what: str = "instruction") -> None:
        """One sentence when `text` holds an image placeholder, which the processor would take for an image."""
        if _IMAGE_PLACEHOLDER.search(text):
            raise UserInputError(f"The {what} may not contain an image tag such as '<|image_1|>'; the image to edit "
                                 "is given on its own.")

    def instruction_layout(self, pipe, call: dict, ranges: Sequence[tuple[int, int]]) -> OmniGenLayout:
        """Token positions, in the cond row the transformer receives, of each character range
        (start, end) of ``call["prompt"]`` (the keyword arguments of `edit_kwargs`).

        Runs the pipeline's own multimodal processor with the arguments the pipeline passes it,
        then tokenizes the chunk holding each range with offsets (the exact text the processor
        tokenizes) and keeps the tokens whose characters (leading whitespace aside) overlap the
        range.  Checks, with AssertionError where a tokenizer breaks the reasoning: the chunk's
        tokens are the processor's ids at the computed positions, and each span decodes back to
        its range (whitespace and case aside).  A range must lie after the first image tag.
        """
        from attention_processors.saas import part_tokens

        processor, tokenizer = pipe.multimodal_processor, pipe.tokenizer
        prompt, images = call["prompt"], call["input_images"]
        height, width = call["height"], call["width"]
        # what OmniGenPipeline.__call__ does before it calls the processor
        if call["max_input_image_size"] != processor.max_image_size:
            processor.reset_max_image_size(max_image_size=call["max_input_image_size"])
        data = processor(prompt, images, height=height, width=width, use_img_cfg=True,
                         use_input_image_size_as_output=False, num_images_per_prompt=1)
        ids = data["input_ids"]
        image_slots = [slice(int(a), int(b)) for a, b in data["input_image_sizes"].get(0, [])]
        text = processor.add_prefix_instruction(prompt)
        prompt_at = text.index(prompt)
        # chunk k of the processor lies between image tag k - 1 and image tag k
        tags = list(_IMAGE_PLACEHOLDER.finditer(text))
        if len(tags) != len(image_slots):
            raise AssertionError(f"{len(tags)} image tags, {len(image_slots)} image spans in the cond row")
        bounds = [0, *(m.end() for m in tags)], [*(m.start() for m in tags), len(text)]
        encoded: dict[int, tuple[list[int], list[tuple[int, int]], int]] = {}  # chunk -> ids, offsets, start
        spans = []
        for a, b in ranges:
            a, b = a + prompt_at, b + prompt_at
            chunk = next((k for k, (lo, hi) in enumerate(zip(*bounds)) if lo <= a and b <= hi), None)
            if not chunk:  # None (the range crosses an image) or 0 (before the first image)
                raise AssertionError(f"characters {a}..{b} of {text!r} do not lie after an image tag in one chunk")
            lo = bounds[0][chunk]
            if chunk not in encoded:
                chunk_text = text[lo : bounds[1][chunk]]
                enc = tokenizer(chunk_text, return_offsets_mapping=True)
                chunk_ids, offsets = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
                if chunk_ids and chunk_ids[0] == _PROCESSOR_BOS_ID:
                    chunk_ids, offsets = chunk_ids[1:], offsets[1:]
                start = image_slots[chunk - 1].stop  # the chunk follows its image directly
                row = ids[0, start : start + len(chunk_ids)].tolist()
                assert row == chunk_ids, f"chunk {chunk} is not where the processor put it ({row} != {chunk_ids})"
                encoded[chunk] = (chunk_ids, [(s + lo, e + lo) for s, e in offsets], start)
            chunk_ids, offsets, start = encoded[chunk]
            within = part_tokens(tokenizer, chunk_ids, offsets, text, (a, b))
            spans.append(slice(start + within.start, start + within.stop))
        patch, factor = pipe.transformer.config.patch_size, self.vae_factor(pipe)
        out_tokens = (int(height) // factor // patch) * (int(width) // factor // patch)
        own = int(ids.shape[1]) - int((data["position_ids"][0] == 0).sum()) + 1  # left padding has position 0
        return OmniGenLayout(spans=spans, input_images=image_slots, seq_len=int(ids.shape[1]) + 1 + out_tokens,
                             text_tokens=own)

    def check_sequence(self, pipe, layout: OmniGenLayout, what: str = "instruction") -> None:
        """One sentence when the sequence would be longer than the positions OmniGen's rotary
        embedding was built for at its short-context scale (`original_max_position_embeddings`,
        4,096 in v1; past it the model switches to its long-context factors)."""
        limit = int(pipe.transformer.config.original_max_position_embeddings)
        if layout.seq_len > limit:
            raise UserInputError(f"With this image the {what} makes a sequence of {layout.seq_len} tokens, but this "
                                 f"model reads at most {limit}; shorten the {what}.")


OMNIGEN = OmniGen()
