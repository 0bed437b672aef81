"""SD3 MMDiTs: keys hold 77 CLIP positions, then the T5 positions; rectified flow."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from .base import Backbone, EncodedText, TextSegment


class StableDiffusion3(Backbone):
    name = "sd3"
    label = "SD3 MMDiT"
    short = "SD3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    flow_matching = True

    def matches(self, denoiser) -> bool:
        return isinstance(denoiser, SD3Transformer2DModel)

    def size_multiple(self, pipe) -> int:
        return self.vae_factor(pipe) * pipe.transformer.config.patch_size

    def text_segments(self, pipe):
        return (TextSegment("clip", "tokenizer", 77), TextSegment("t5", "tokenizer_3", 256, trimmable=True))

    def encode_text(self, pipe, prompt, device, lengths) -> EncodedText:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=lengths["t5"])
        return EncodedText(embeds, pooled)

    def noisy_forward(self, pipe, latents, noise, text, *, sigma, timestep, guidance) -> None:
        b = latents.shape[0]
        noisy = (1 - sigma) * latents + sigma * noise
        t = torch.full((b,), sigma * 1000, device=latents.device, dtype=latents.dtype)
        pipe.transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=text.embeds.expand(b, -1, -1),
                         pooled_projections=text.pooled.expand(b, -1), return_dict=False)


SD3 = StableDiffusion3()
