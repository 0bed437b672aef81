"""FLUX MMDiTs (dual + single stream): T5 keys only (CLIP is pooled), 2x2 latent patches as tokens,
rectified flow, guidance as an embedding (no CFG batch, no negative prompt)."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from .base import Backbone, EncodedText, TextSegment


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) latents -> (b, h/2 * w/2, 4c) tokens, one per 2x2 patch, row-major."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def latent_image_ids(rows: int, cols: int, device, dtype) -> torch.Tensor:
    """(rows * cols, 3) position ids of the image tokens: (0, row, column)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


class Flux(Backbone):
    name = "flux"
    label = "FLUX MMDiT"
    short = "FLUX"
    pipeline_classes = ("FluxPipeline",)
    flow_matching = True
    guidance_embedded = True

    def matches(self, denoiser) -> bool:
        return isinstance(denoiser, FluxTransformer2DModel)

    def size_multiple(self, pipe) -> int:
        return self.vae_factor(pipe) * 2  # 2x2 latent patches are packed into one token

    def text_segments(self, pipe):
        return (TextSegment("t5", "tokenizer_2", 512, trimmable=True),)

    def encode_text(self, pipe, prompt, device, lengths) -> EncodedText:
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=prompt, device=device,
                                                      max_sequence_length=lengths["t5"])
        return EncodedText(embeds, pooled, text_ids)

    def noisy_forward(self, pipe, latents, noise, text, *, sigma, timestep, guidance) -> None:
        transformer = pipe.transformer
        b, _, h, w = latents.shape
        device, dtype = latents.device, latents.dtype
        noisy = (1 - sigma) * latents + sigma * noise
        guidance_input = (torch.full((b,), guidance, device=device, dtype=torch.float32)
                          if transformer.config.guidance_embeds else None)
        transformer(hidden_states=pack_latents(noisy), timestep=torch.full((b,), sigma, device=device, dtype=dtype),
                    guidance=guidance_input, pooled_projections=text.pooled.expand(b, -1),
                    encoder_hidden_states=text.embeds.expand(b, -1, -1), txt_ids=text.text_ids,
                    img_ids=latent_image_ids(h // 2, w // 2, device, dtype), return_dict=False)


FLUX = Flux()
