"""PixArt-alpha / Sigma DiTs: T5 text (120 tokens as the pipeline keeps them), patchified latents."""

from __future__ import annotations

import importlib.util

from diffusers import PixArtTransformer2DModel

from .base import Backbone, TextSegment

#: sample sizes (latent sides) that have aspect-ratio bins in diffusers (256/512/1024 px models)
_BINNED_SAMPLE_SIZES = (32, 64, 128)


class PixArt(Backbone):
    name = "pixart"
    label = "PixArt-alpha DiT"
    short = "PixArt"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    min_steps = 2  # its scheduler set-up fails on one step

    def matches(self, denoiser) -> bool:
        return isinstance(denoiser, PixArtTransformer2DModel)

    def size_multiple(self, pipe) -> int:
        return self.vae_factor(pipe) * pipe.transformer.config.patch_size

    def call_defaults(self, pipe, exact_size=False, raw_prompt=False) -> dict:
        # Sizes snap to aspect-ratio bins that exist only for some sample sizes, and raise for
        # others (the tiny model); exact_size always makes the size asked for.
        defaults = {}
        if exact_size or pipe.transformer.config.sample_size not in _BINNED_SAMPLE_SIZES:
            defaults["use_resolution_binning"] = False
        # Caption cleaning needs beautifulsoup4 and ftfy; without them the pipeline prints a long
        # notice on every call and then skips cleaning anyway.
        if raw_prompt or importlib.util.find_spec("bs4") is None or importlib.util.find_spec("ftfy") is None:
            defaults["clean_caption"] = False
        return defaults

    def text_segments(self, pipe):
        return (TextSegment("t5", "tokenizer", 120),)

    def prompt_embeds(self, pipe, prompt, negative_prompt, cfg, device, clean_caption=True) -> dict:
        pe, pm, ne, nm = pipe.encode_prompt(prompt, cfg, negative_prompt=negative_prompt, num_images_per_prompt=1,
                                            device=device, clean_caption=clean_caption, max_sequence_length=120)
        # negative_prompt=None: the pipeline's default "" would clash with (or lack) negative embeddings
        embeds = dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt=None)
        if cfg:
            embeds.update(negative_prompt_embeds=ne, negative_prompt_attention_mask=nm)
        return embeds


PIXART = PixArt()
