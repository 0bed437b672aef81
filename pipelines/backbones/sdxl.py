"""SDXL UNets: two CLIP encoders concatenated per token (77 positions), pooled text and size conditions."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from .base import EncodedText
from .sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    label = "SDXL UNet"
    short = "SDXL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    img2img_class = "StableDiffusionXLImg2ImgPipeline"

    def matches(self, denoiser) -> bool:
        return isinstance(denoiser, UNet2DConditionModel) and denoiser.config.addition_embed_type == "text_time"

    @staticmethod
    def is_v2(unet) -> bool:
        return False

    # text_segments: SD's one "clip" segment of 77 positions (both encoders share the tokens)

    def encode_text(self, pipe, prompt, device, lengths) -> EncodedText:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return EncodedText(embeds, pooled)

    def prompt_embeds(self, pipe, prompt, negative_prompt, cfg, device, clean_caption=True) -> dict:
        pe, ne, ppe, npe = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=cfg, negative_prompt=negative_prompt)
        embeds = dict(prompt_embeds=pe, pooled_prompt_embeds=ppe)
        if cfg:
            embeds.update(negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npe)
        return embeds

    def conditioning(self, pipe, prompt, height, width, device, dtype):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        # micro-conditioning: original = target = working size, crop (0, 0)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
        return embeds.to(dtype), {"text_embeds": pooled.to(dtype), "time_ids": time_ids}


SDXL = StableDiffusionXL()
