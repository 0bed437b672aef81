"""The "Attention maps" task: generate an image and one heatmap per prompt word (DAAM).

The stock diffusers pipeline runs unchanged; `CrossAttentionHeatmaps` is attached to the
text-attention layers for the duration of the call and accumulates the conditional rows'
head-averaged maps over layers and steps.  Tokens are then merged into the words of the prompt
(multi-token words summed, as DAAM does), each word map is upsampled to the image size and
min-max normalised.

Which text keys hold the prompt differs per family: SD/SDXL/PixArt cross-attention keys are the
tokens of `pipe.tokenizer`; SD3's joint text is 77 CLIP tokens then T5 tokens (we read the CLIP
part); FLUX's is T5 only (`pipe.tokenizer_2`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attention_processors import ControlState, attach, attention_layer_names
from attention_processors.heatmaps import LAYER_GROUPS, CrossAttentionHeatmaps, text_attention_layers

from . import backbones, models
from .viz import overlay
from .errors import UserInputError
from .io import save_image
from .seeds import resolve_seed
from .tokenizers import check_fits

LAYER_CHOICES = LAYER_GROUPS
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MIN_SIDE, MAX_SIDE = 64, 2048
_WORD = re.compile(r"[\w]+(?:['’-][\w]+)*")


@dataclass
class AttentionMapsResult:
    image: Image.Image
    words: list[str]  # prompt words in order, multi-token words merged
    maps: np.ndarray  # float32 (len(words), H, W) in [0, 1], at image size
    seed: int
    params: dict = field(default_factory=dict)

    def overlays(self, alpha: float = 0.5) -> list[tuple[Image.Image, str]]:
        """(heatmap over the image, "i: word") per word, ready for a gallery."""
        return [(overlay(self.image, m, alpha), f"{i}: {w}") for i, (w, m) in enumerate(zip(self.words, self.maps))]

    def save(self, output: str | Path, heatmap_dir: str | Path | None = None) -> list[Path]:
        """Write the image (parameters in its PNG text and a JSON sidecar) and the heatmaps."""
        record = {**self.params, "seed": self.seed, "words": self.words}
        written = save_image(self.image, output, record)
        if heatmap_dir is not None:
            for i, (image, _) in enumerate(self.overlays()):
                path = Path(heatmap_dir) / f"{i:02d}_{_file_safe(self.words[i])}.png"
                written += save_image(image, path, None)
        return written



def _file_safe(word: str) -> str:
    return re.sub(r"[^\w-]+", "_", word)[:40] or "word"


def _text_layout(pipe) -> tuple:
    """(tokenizer, max_length, text_part) of the text keys that hold the prompt: the first text
    segment of the backbone (SD3: its CLIP part, ahead of the T5 part)."""
    return models.backbone(pipe).text_layout(pipe).first()


def prompt_words(prompt: str) -> list[tuple[str, int, int]]:
    """Words of the prompt with their character spans; punctuation is not a word."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(prompt)]


def token_words(tokenizer, prompt: str, max_length: int) -> tuple[list[int | None], int]:
    """Word index of every token position (None for special tokens), and the token count."""
    encoded = tokenizer(prompt, truncation=True, max_length=max_length, return_offsets_mapping=True)
    words = prompt_words(prompt)
    owners: list[int | None] = []
    for start, end in encoded["offset_mapping"]:
        owner = None
        if end > start:
            for i, (_, ws, we) in enumerate(words):
                if start < we and end > ws:  # overlap (sentencepiece pieces may include the space)
                    owner = i
                    break
        owners.append(owner)
    return owners, len(encoded["input_ids"])


def _validate(pipe, prompt, negative_prompt, steps, guidance, height, width, layers) -> None:
    if not prompt or not prompt.strip():
        raise UserInputError("Please enter a prompt.")
    if not prompt_words(prompt):
        raise UserInputError("The prompt has no words to map; use letters or digits.")
    if not 1 <= steps <= MAX_STEPS:
        raise UserInputError(f"Steps must be between 1 and {MAX_STEPS}, not {steps}.")
    backbone = backbones.require(pipe, backbones.ALL, "Capturing attention maps")
    if steps < backbone.min_steps:
        raise UserInputError(f"{backbone.short} models need at least {backbone.min_steps} steps.")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise UserInputError(f"Guidance must be between 0 and {MAX_GUIDANCE:g}, not {guidance:g}.")
    models.check_size(pipe, height, width, MIN_SIDE, MAX_SIDE)
    if layers not in LAYER_CHOICES:
        raise UserInputError(f"Layers must be one of {', '.join(LAYER_CHOICES)}, not {layers!r}.")
    if backbone.guidance_embedded and negative_prompt.strip():
        raise UserInputError(f"{backbone.short} models are guidance-distilled and take no negative prompt; leave it empty.")
    tokenizer, max_length, _ = _text_layout(pipe)
    check_fits(tokenizer, prompt, max_length)
    check_fits(tokenizer, negative_prompt, max_length, "negative prompt")


@models.one_call_at_a_time
def generate_with_attention_maps(
    pipe,
    prompt: str,
    negative_prompt: str = "",
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    layers: str = "all",
) -> AttentionMapsResult:
    """Generate one image and the attention heatmap of every word of `prompt`.

    seed None (or negative) draws a random seed, reported in the result.  Steps and guidance
    default to the model's (`models.generation_defaults`: 25 and 7.5 unless the model folder
    names its own).  Raises UserInputError for any input the model cannot take.
    """
    default_h, default_w = models.default_size(pipe)
    height, width = int(height or default_h), int(width or default_w)
    defaults = models.generation_defaults(pipe)
    steps = int(defaults["steps"] if steps is None else steps)
    guidance = float(defaults["guidance"] if guidance is None else guidance)
    negative_prompt = negative_prompt or ""
    _validate(pipe, prompt, negative_prompt, steps, guidance, height, width, layers)
    seed = resolve_seed(seed)

    denoiser = models.denoiser(pipe)
    tokenizer, max_length, text_part = _text_layout(pipe)
    owners, n_tokens = token_words(tokenizer, prompt, max_length)
    selected = text_attention_layers(attention_layer_names(denoiser), layers)
    backbone = models.backbone(pipe)
    roles = ("uncond", "cond") if backbone.uses_cfg_batch(pipe, guidance) else ("cond",)
    controller = CrossAttentionHeatmaps(selected, text_part=text_part, keep=n_tokens, state=ControlState(row_roles=roles))

    # the prompt text as typed, so that tokens map back onto its words; the size asked for
    kwargs = backbone.call_defaults(pipe, exact_size=True, raw_prompt=True)
    if not backbone.guidance_embedded:
        kwargs["negative_prompt"] = negative_prompt
    generator = torch.Generator().manual_seed(seed)  # CPU generator: same image on any device
    with attach(denoiser, controller):
        image = pipe(
            prompt=prompt, num_inference_steps=steps, guidance_scale=guidance,
            height=height, width=width, generator=generator, **kwargs,
        ).images[0]

    token_maps = controller.maps()[0]  # (tokens, H_latent, W_latent)
    words = prompt_words(prompt)
    kept_words, word_maps, truncated = [], [], []
    for i, (word, _, _) in enumerate(words):
        columns = [t for t, owner in enumerate(owners) if owner == i]
        if columns:
            kept_words.append(word)
            word_maps.append(token_maps[columns].sum(0))
        else:  # past the tokenizer's limit: truncated away, so the model never saw it
            truncated.append(word)
    stacked = torch.stack(word_maps)[None]
    stacked = F.interpolate(stacked, size=(height, width), mode="bilinear", align_corners=False)[0]
    low = stacked.amin(dim=(1, 2), keepdim=True)
    high = stacked.amax(dim=(1, 2), keepdim=True)
    normalised = ((stacked - low) / (high - low).clamp_min(1e-12)).cpu().numpy().astype(np.float32)

    params = {
        "task": "attention_maps",
        "model": pipe.name_or_path or type(pipe).__name__,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "height": height,
        "width": width,
        "layers": layers,
        "captured_layers": len(selected),
        "truncated_words": truncated,
    }
    return AttentionMapsResult(image=image, words=kept_words, maps=normalised, seed=seed, params=params)
