"""SD 1.x / 2.x UNets, and the project's `builtin` model (an SD-layout UNet with a CLIP text tower)."""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel

from .base import Backbone, EncodedText, TextSegment


#: The noise schedule SD 1.x/2.x and SDXL checkpoints ship with (their schedulers add spacing,
#: offsets and prediction type on top); our tiny models and `builtin` use it too.
NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


class StableDiffusion(Backbone):
    name = "sd"
    label = "SD 1.x/2.x UNet"
    short = "SD"
    pipeline_classes = ("StableDiffusionPipeline",)
    img2img_class = "StableDiffusionImg2ImgPipeline"

    def matches(self, denoiser) -> bool:
        return isinstance(denoiser, UNet2DConditionModel) and denoiser.config.addition_embed_type != "text_time"

    def size_multiple(self, pipe) -> int:
        # diffusers' Stable Diffusion pipelines refuse sides that are not multiples of 8, whatever
        # the VAE's factor (the built-in model's is 4)
        return math.lcm(self.vae_factor(pipe), 8)

    def grid_multiple(self, pipe) -> int:
        # every down-sampling halves the grid: the deepest level must still be whole
        return self.vae_factor(pipe) * 2 ** (len(pipe.unet.config.down_block_types) - 1)

    def unet_depth(self, denoiser) -> int | None:
        return len(denoiser.down_blocks)

    @staticmethod
    def is_v2(unet) -> bool:
        """SD 2.x: an OpenCLIP ViT-H text width (1024) or linear projections in the transformers."""
        return unet.config.cross_attention_dim == 1024 or bool(unet.config.use_linear_projection)

    def text_segments(self, pipe):
        return (TextSegment("clip", "tokenizer"),)

    def encode_text(self, pipe, prompt, device, lengths) -> EncodedText:
        embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
        return EncodedText(embeds)

    def prompt_embeds(self, pipe, prompt, negative_prompt, cfg, device, clean_caption=True) -> dict:
        pe, ne = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt)
        return dict(prompt_embeds=pe, negative_prompt_embeds=ne) if cfg else dict(prompt_embeds=pe)

    def conditioning(self, pipe, prompt, height, width, device, dtype):
        embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
        return embeds.to(dtype), None

    def noisy_forward(self, pipe, latents, noise, text, *, sigma, timestep, guidance) -> None:
        b = latents.shape[0]
        t = torch.full((b,), timestep, device=latents.device, dtype=torch.long)
        noisy = pipe.scheduler.add_noise(latents, noise, t)
        pipe.unet(noisy, t, encoder_hidden_states=text.embeds.expand(b, -1, -1), return_dict=False)


SD = StableDiffusion()
