"""What every backbone answers: the interface tasks program against instead of family names.

A backbone is a stateless singleton: its methods take the pipeline and never change it, so one
instance serves every cached model, thread and caller.  Facts a task has no use for on a
backbone it does not support are left to the base class, which refuses them loudly
(`NotImplementedError`), because a task first checks `require()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.errors import UserInputError


@dataclass(frozen=True)
class TextSegment:
    """One run of key positions that holds one tokenizer's tokens, in the order the keys have them.

    name: which encoder's tokens ("clip" or "t5"), the name a task uses to pick segments.
    tokenizer: the pipeline attribute of the tokenizer that makes them.
    length: number of positions, or None for the tokenizer's `model_max_length`.
    trimmable: whether the pipeline takes a shorter `max_sequence_length` for this segment.
    """

    name: str
    tokenizer: str
    length: int | None = None
    trimmable: bool = False


@dataclass
class TextLayout:
    """The text keys of one pipeline: segments resolved to tokenizers and lengths."""

    segments: list[tuple[TextSegment, object, int]]  # (segment, tokenizer, length)

    def first(self) -> tuple[object, int, slice | None]:
        """(tokenizer, length, key slice) of the first segment; slice None when it is all the text."""
        segment, tokenizer, length = self.segments[0]
        return tokenizer, length, (slice(0, length) if len(self.segments) > 1 else None)


@dataclass
class EncodedText:
    """A prompt encoded for the denoiser's conditional row (no CFG)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None  # FLUX's position ids of the text tokens


class Backbone:
    """One model family.  Subclasses live one per file in this package."""

    name: str = "other"  # recorded in results and benchmarks
    label: str = "diffusers pipeline"  # one line for the UI's model picker
    short: str = "diffusers"  # in sentences: "Remove object works with SD and SDXL models"
    pipeline_classes: tuple[str, ...] = ()  # `_class_name`s in model_index.json
    #: the noise schedule a single noisy forward uses: rectified flow (sigma) or DDPM (timestep)
    flow_matching: bool = False
    #: guidance is an input embedding (guidance-distilled): no CFG batch, no negative prompt
    guidance_embedded: bool = False
    #: fewest inference steps its pipeline accepts
    min_steps: int = 1
    #: draws an image from text alone (False: InstructPix2Pix, which needs a source image)
    text_to_image: bool = True

    def __repr__(self) -> str:
        return f"<backbone {self.name}>"

    # ------------------------------------------------------------------ detection

    def matches(self, denoiser) -> bool:
        """Whether this denoiser (UNet or transformer) is of this family."""
        return False

    # ------------------------------------------------------------------ sizes

    def vae_factor(self, pipe) -> int:
        return int(getattr(pipe, "vae_scale_factor", 8))

    def size_multiple(self, pipe) -> int:
        """Image sides the pipeline accepts are multiples of this."""
        return self.vae_factor(pipe)

    def grid_multiple(self, pipe) -> int:
        """Image sides that make every attention layer's token grid whole."""
        return self.size_multiple(pipe)

    def unet_depth(self, denoiser) -> int | None:
        """Number of UNet resolution levels, None for transformers (one token grid)."""
        return None

    # ------------------------------------------------------------------ calling the pipeline

    def call_defaults(self, pipe, exact_size: bool = False, raw_prompt: bool = False) -> dict:
        """Keyword arguments for `pipe(...)`: accept any size quietly; with `exact_size` make
        exactly the size asked for, with `raw_prompt` keep the prompt text as typed."""
        return {}

    def uses_cfg_batch(self, pipe, guidance: float) -> bool:
        """Whether the stock pipeline stacks [uncond, cond] rows at this guidance.

        UNets distilled with a guidance embedding (time_cond_proj_dim, e.g. LCM) skip CFG too.
        """
        if self.guidance_embedded:
            return False
        denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
        return guidance > 1 and getattr(denoiser.config, "time_cond_proj_dim", None) is None

    def row_roles(self, pipe, guidance: float) -> tuple[str, ...]:
        """What each equal chunk of the denoiser's batch is, in order, for the stock pipeline at
        this guidance: ("uncond", "cond") with a CFG batch, else ("cond",).  A backbone with more
        guidance rows (OmniGen: uncond, text, image) returns its own; processors read the roles
        from the per-call state (`ControlState.row_roles`) and never infer halves."""
        return ("uncond", "cond") if self.uses_cfg_batch(pipe, guidance) else ("cond",)

    # ------------------------------------------------------------------ text

    def text_segments(self, pipe) -> tuple[TextSegment, ...]:
        raise UserInputError(f"This {self.label} is not a model family the tasks know.")

    def text_layout(self, pipe) -> TextLayout:
        resolved = []
        for segment in self.text_segments(pipe):
            tokenizer = getattr(pipe, segment.tokenizer)
            resolved.append((segment, tokenizer, int(segment.length or tokenizer.model_max_length)))
        return TextLayout(resolved)

    def encode_text(self, pipe, prompt: str, device, lengths: dict[str, int]) -> EncodedText:
        """The conditional text input; `lengths` gives trimmable segments' lengths by name."""
        raise NotImplementedError(f"{self.name}: encode_text")

    def prompt_embeds(self, pipe, prompt: str, negative_prompt: str, cfg: bool, device,
                      clean_caption: bool = True) -> dict:
        """`pipe(...)` keyword arguments carrying the encoded prompt (and negative prompt with CFG)."""
        raise NotImplementedError(f"{self.name}: prompt_embeds")

    def conditioning(self, pipe, prompt: str, height: int, width: int, device, dtype) -> tuple[torch.Tensor, dict | None]:
        """One row's embeddings of `prompt` and the UNet's added conditions (or None)."""
        raise NotImplementedError(f"{self.name}: conditioning")

    def unconditional(self, pipe, height: int, width: int, device, dtype) -> tuple[torch.Tensor, dict | None]:
        """Empty-prompt embeddings for one row and the UNet's added conditions (or None)."""
        return self.conditioning(pipe, "", height, width, device, dtype)

    # ------------------------------------------------------------------ one noisy forward

    def encode_latents(self, pipe, pixels: torch.Tensor, dtype) -> torch.Tensor:
        """VAE latents of pixels in [-1, 1], scaled (and shifted) as the denoiser expects them."""
        vae = pipe.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(dtype)

    def noisy_forward(self, pipe, latents: torch.Tensor, noise: torch.Tensor, text: EncodedText, *,
                      sigma: float, timestep: int, guidance: float) -> None:
        """One denoiser call on `latents` noised to `sigma` (flow) or `timestep` (DDPM)."""
        raise NotImplementedError(f"{self.name}: noisy_forward")


OTHER = Backbone()
