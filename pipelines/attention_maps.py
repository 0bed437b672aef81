"""The "Attention maps" task: generate an image and one heatmap per prompt word (DAAM).

The stock diffusers pipeline runs unchanged; `CrossAttentionHeatmaps` is attached to the
text-attention layers for the duration of the call and accumulates the conditional rows'
head-averaged maps over layers and steps.  Tokens are then merged into the words of the prompt
(multi-token words summed, as DAAM does), each word map is upsampled to the image size and
min-max normalised.

Which text keys hold the prompt differs per family: SD/SDXL/PixArt cross-attention keys are the
tokens of `pipe.tokenizer`; SD3's joint text is 77 CLIP tokens then T5 tokens (we read the CLIP
part); FLUX's is T5 only (`pipe.tokenizer_2`).

Method notes (what is averaged, the layers per family, every default and the deviations from
DAAM): docs/methods/attention_maps.md.  The defaults live in one place, `AttentionMapSettings`
(pipelines/attention_maps_settings.py); the CLI flags and the tab's controls are made from it.
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
from attention_processors.heatmaps import CrossAttentionHeatmaps, text_attention_layers

from . import backbones, models
from .attention_maps_settings import (
    DEFAULTS,
    LAYER_GROUPS,
    MAX_GUIDANCE,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    AttentionMapSettings,
)
from .viz import overlay
from .errors import UserInputError
from .io import save_image
from .seeds import resolve_seed
from .tokenizers import check_fits

__all__ = ["AttentionMapSettings", "AttentionMapsResult", "DEFAULTS", "LAYER_CHOICES", "MAX_GUIDANCE", "MAX_SIDE",
           "MAX_STEPS", "MIN_SIDE", "generate_with_attention_maps", "prompt_words", "run_steps", "token_words"]

LAYER_CHOICES = LAYER_GROUPS
_WORD = re.compile(r"[\w]+(?:['’-][\w]+)*")


@dataclass
class AttentionMapsResult:
    image: Image.Image
    words: list[str]  # prompt words in order, multi-token words merged
    maps: np.ndarray  # float32 (len(words), H, W) in [0, 1], at image size
    seed: int
    params: dict = field(default_factory=dict)
    overlay_alpha: float = DEFAULTS.overlay_alpha  # the heatmaps' opacity in `overlays()` and `save()`

    def overlays(self, alpha: float | None = None) -> list[tuple[Image.Image, str]]:
        """(heatmap over the image, "i: word") per word, ready for a gallery; alpha None: the
        result's `overlay_alpha` (the settings')."""
        alpha = self.overlay_alpha if alpha is None else alpha
        return [(overlay(self.image, m, alpha), f"{i}: {w}") for i, (w, m) in enumerate(zip(self.words, self.maps))]

    def save(self, output: str | Path, heatmap_dir: str | Path | None = None) -> list[Path]:
        """Write the image (parameters in its PNG text and a JSON sidecar) and the heatmaps."""
        record = {**self.params, "seed": self.seed, "words": self.words}
        if heatmap_dir is not None:
            record["overlay_alpha"] = self.overlay_alpha
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


def _validate(pipe, prompt: str, settings: AttentionMapSettings, steps: int, height: int, width: int) -> None:
    """What the settings' own validation cannot know: the prompt and what this model accepts."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserInputError("Please enter a prompt.")
    if not prompt_words(prompt):
        raise UserInputError("The prompt has no words to map; use letters or digits.")
    backbone = backbones.require(pipe, backbones.TEXT_TO_IMAGE, "Capturing attention maps")
    if steps < backbone.min_steps:
        raise UserInputError(f"{backbone.short} models need at least {backbone.min_steps} steps.")
    models.check_size(pipe, height, width, MIN_SIDE, MAX_SIDE)
    if backbone.guidance_embedded and settings.negative_prompt.strip():
        raise UserInputError(f"{backbone.short} models are guidance-distilled and take no negative prompt; leave it empty.")
    tokenizer, max_length, _ = _text_layout(pipe)
    check_fits(tokenizer, prompt, max_length)
    check_fits(tokenizer, settings.negative_prompt, max_length, "negative prompt")


def run_steps(pipe, settings: AttentionMapSettings) -> int:
    """The denoising steps a run with `settings` takes on `pipe`: the settings', else the model's
    (`models.generation_defaults`).  The tab checks them against the server's --max-steps."""
    return int(models.generation_defaults(pipe)["steps"] if settings.steps is None else settings.steps)


@models.one_call_at_a_time
def generate_with_attention_maps(
    pipe,
    prompt: str,
    settings: AttentionMapSettings | None = None,
    *,
    seed: int | None = None,
    progress: bool | None = None,
    **overrides,
) -> AttentionMapsResult:
    """Generate one image and the attention heatmap of every word of `prompt`.

    settings: `AttentionMapSettings` (`DEFAULTS` if None); `overrides` change its fields by name
    (`generate_with_attention_maps(pipe, "a cat", steps=20, layers="up")`); an unknown name is a
    TypeError.  Steps, guidance and size left None are the model's (`models.generation_defaults`:
    the model folder's training.json, else SD's 25 and 7.5; `models.default_size`).
    seed None (or negative) draws a random seed, reported in the result.  progress False hides
    the pipeline's progress bar for this call.  Raises UserInputError for any input the model
    cannot take.
    """
    if settings is not None and not isinstance(settings, AttentionMapSettings):
        raise TypeError(f"settings must be an AttentionMapSettings, not {type(settings).__name__}; pass "
                        "negative_prompt=... and the other settings by name")
    settings = (settings or DEFAULTS).replace(**overrides).validated()
    default_h, default_w = models.default_size(pipe)
    height, width = settings.height or default_h, settings.width or default_w
    defaults = models.generation_defaults(pipe)
    steps = run_steps(pipe, settings)
    guidance = float(defaults["guidance"] if settings.guidance is None else settings.guidance)
    negative_prompt, layers = settings.negative_prompt, settings.layers
    _validate(pipe, prompt, settings, steps, height, width)
    seed = resolve_seed(seed)

    denoiser = models.denoiser(pipe)
    tokenizer, max_length, text_part = _text_layout(pipe)
    owners, n_tokens = token_words(tokenizer, prompt, max_length)
    selected = text_attention_layers(attention_layer_names(denoiser), layers)
    backbone = models.backbone(pipe)
    roles = backbone.row_roles(pipe, guidance)
    controller = CrossAttentionHeatmaps(selected, text_part=text_part, keep=n_tokens, state=ControlState(row_roles=roles))

    # the prompt text as typed, so that tokens map back onto its words; the size asked for
    kwargs = backbone.call_defaults(pipe, exact_size=True, raw_prompt=True)
    if not backbone.guidance_embedded:
        kwargs["negative_prompt"] = negative_prompt
    generator = torch.Generator().manual_seed(seed)  # CPU generator: same image on any device
    call = models.quiet_view(pipe) if progress is False else pipe  # never changes the shared pipeline
    with attach(denoiser, controller):
        image = call(
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
    return AttentionMapsResult(image=image, words=kept_words, maps=normalised, seed=seed, params=params,
                               overlay_alpha=settings.overlay_alpha)
