"""The "Segment by text" task: RefAM zero-shot referring segmentation of images and video.

Given an image (or video frames) and a referring expression ("the man in the red shirt on the
left"), RefAM (arXiv 2509.22650) reads where the image tokens of a diffusion transformer attend
among the expression's tokens in ONE forward pass of a noised latent, and thresholds that map:

1. prompt = expression + k appended "attention magnets" (stop words) + one colour word; every token
   gets a role from the tokenizer's offsets: content, stop, magnet, aux, special, padding
   (`token_roles`).  Stop words come from `assets/stopwords_en.txt` (another language: another
   file, `load_stopwords`).
2. the image is resized (long side `size`, aspect kept), padded to the model's multiple, VAE
   encoded, noised once (FLUX/SD3: x = (1 - sigma) x0 + sigma eps; UNet: the scheduler's
   `add_noise` at timestep t) and passed once through the denoiser with
   `attention_processors.refam.RefAMCapture` attached: image x text attention on the chosen
   layers, sink detection, and an early exit after the last captured layer (no full forward, no
   denoising loop, no VAE decode).
3. heatmap = mean over layers and content columns, rows renormalised (DiTs; UNets by default
   not) over the word columns (content, stop, magnets: the magnets compete for the mass there)
   with specials, padding and sinks dropped; magnet and stop columns never enter the mean.  Then a Gaussian (sigma = 1
   token cell), bilinear upsampling to the padded working size, padding cropped, resizing to the
   image and min-max normalisation.
4. mask = heatmap > Otsu threshold (or a fixed one), keeping the connected component of the
   argmax; optionally refined by self-attention propagation (UNets) or replaced by SAM2's
   point-prompted mask when the user has SAM2 weights.
5. video: frames in batches through the same forward, the same noise for every frame, per-frame
   heatmaps smoothed over a centred window of frames, one mask per frame.

Every default is in `GroundingSettings` (pipelines/grounding_settings.py: one place, with its
limits and help; the CLI flags and the tab's controls are made from it).  The paper's layers,
noise level, normalisation, sink criterion and point strategy are not public: all are ours (see
docs/methods/grounding.md) and exposed as parameters.  Without settings, `segment_image` uses the
model's (`GroundingSettings.for_model`): these, except where a model folder ships measured
defaults of its own; the built-in model's mask readout is unsmoothed with threshold 0.5 (mIoU
0.424 against 0.282 on 50 benchmark scenes: a 16x16 map of a 64 px image, smoothed by one cell
and cut at Otsu's level, spread over the neighbours).

Deviations and choices (ours):
- backbones: FLUX (the paper's), SD3 and SD 1.x/2.x UNets (our extension); SDXL and PixArt are
  refused with a sentence;
- the VAE posterior mode is used (no sampling): one fewer random draw;
- "head" target = the content word before the first stop word that follows a content word (a
  heuristic instead of a parser), e.g. "the man in red" -> "man";
- redirect mode appends `n_aux` "." tokens after the magnets (always dropped) and suppresses the
  sinks found by a first observe pass (two passes); suppress mode does the same without the dots;
- an expression + magnets longer than the text window is refused (never silently truncated);
- video: the keyframe + SAM2 video-predictor route of our method notes is not implemented; every frame
  gets its own heatmap (the issue's route), with temporal smoothing;
- min-max normalisation is applied after cropping the padding, so padding never sets the scale;
- the rows are renormalised over the word columns, not over the target columns only as our first design's
  3.5 reads (that makes the heatmap constant; see attention_processors/refam.py), and on DiTs
  only: on UNets the default is no renormalisation, because on the built-in model it inverts
  the heatmap (v1: mIoU 0.020 vs 0.189 without; v2: 0.239 vs 0.282; `GroundingSettings.renorm`,
  docs/methods/grounding.md);
- SAM2: transformers' Sam2Processor needs torchvision, so `sam2_mask` does SAM2's preprocessing
  itself (square resize, ImageNet normalisation) and calls `Sam2Model` directly;
- the SD UNet's start-of-text sink is always outside the normaliser (it is a special token);
- an optional LLM rewrite of the expression, box prompts and the SAM2 oracle metric are not built.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attention_processors import ControlState, attach, attention_layer_names
from attention_processors.refam import (
    RefAMCapture,
    StopForward,
    auto_unet_levels,
    choose_layers,
    self_attention_layers,
)

from . import backbones, models
from .errors import UserInputError, out_of_memory_message
from .stopping import Stopped
from .grounding_settings import DEFAULTS, MAGNET_WORDS, MAX_FRAMES, OTSU, PAPER_SIZE, GroundingSettings
from .io import atomic_path, load_image, mask_image, read_video, save_image, write_video
from .viz import overlay

STOPWORDS_PATH = Path(__file__).resolve().parent.parent / "assets" / "stopwords_en.txt"
COLOUR_WORDS = ("green", "blue", "yellow", "purple")  # the first one absent from the expression
SUPPORTED = (backbones.FLUX, backbones.SD3, backbones.SD)
#: the backbones of the paper (RefAM on FLUX and SD3); elsewhere its settings are our extrapolation
PAPER_BACKBONES = (backbones.FLUX, backbones.SD3)
ROLES = ("content", "context", "stop", "magnet", "aux", "special", "padding")
_WORD = re.compile(r"[\w]+(?:['’-][\w]+)*")
#: Text encodings per pipeline, the last few prompts each (video batches and repeated calls
#: encode an expression once).  Weak keys: a model dropped from the registry's cache is freed.
_TEXT_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TEXT_CACHES_LOCK = threading.Lock()


@dataclass
class GroundingResult:
    image: Image.Image
    heatmap: np.ndarray  # float32 (H, W) in [0, 1]
    mask: np.ndarray  # bool (H, W)
    tokens: list[tuple[str, str]]  # (token text, role) of the visible prompt tokens
    token_maps: np.ndarray  # float32 (T_visible, H, W) in [0, 1]
    sinks: list[str]  # tokens flagged as global attention sinks in some deep layer
    threshold: float
    params: dict = field(default_factory=dict)

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        return overlay(self.image, self.heatmap, alpha)

    def gallery(self) -> list[tuple[Image.Image, str]]:
        """(per-token map over the image, "i: token (role[, sink])") for every visible token."""
        out = []
        for i, ((text, role), heat) in enumerate(zip(self.tokens, self.token_maps)):
            tag = role + (", sink" if text in self.sinks and role != "padding" else "")
            out.append((overlay(self.image, heat), f"{i}: {text} ({tag})"))
        return out

    def save(self, output: str | Path, heatmap: str | Path | None = None) -> list[Path]:
        """Write the black/white mask PNG (+ JSON sidecar of every setting) and the heatmap overlay."""
        record = {**self.params, "threshold": self.threshold, "sinks": self.sinks,
                  "tokens": [f"{t} ({r})" for t, r in self.tokens]}
        written = save_image(mask_image(self.mask), output, record)
        if heatmap is not None:
            written += save_image(self.overlay(), heatmap, None)
        return written


@dataclass
class VideoGroundingResult:
    frames: list[Image.Image]
    heatmaps: np.ndarray  # (F, H, W)
    masks: np.ndarray  # (F, H, W) bool
    fps: float
    params: dict = field(default_factory=dict)

    def overlays(self) -> list[Image.Image]:
        return [overlay(f, h) for f, h in zip(self.frames, self.heatmaps)]

    def save(self, output: str | Path, overlay_path: str | Path | None = None) -> list[Path]:
        """The mask video, the overlay video (default <output>_overlay.mp4) and a JSON sidecar."""
        output = Path(output)
        overlay_path = Path(overlay_path) if overlay_path else output.with_name(f"{output.stem}_overlay.mp4")
        write_video([mask_image(m).convert("RGB") for m in self.masks], output, self.fps)
        write_video(self.overlays(), overlay_path, self.fps)
        sidecar = output.with_suffix(".json")
        with atomic_path(sidecar) as temp:
            temp.write_text(json.dumps({**self.params, "frames": len(self.masks)}, indent=2, default=str))
        return [output, overlay_path, sidecar]



# --------------------------------------------------------------------------- prompt and roles


def load_stopwords(path: str | Path = STOPWORDS_PATH) -> frozenset[str]:
    """Lower-case stop words, one per line; '#' starts a comment (re-read when the file changes)."""
    path = Path(path)
    return _read_stopwords(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_stopwords(path: Path, mtime_ns: int) -> frozenset[str]:
    words = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            words.add(line)
    return frozenset(words)


def build_prompt(expression: str, magnets: int = DEFAULTS.magnets, colour: bool = DEFAULTS.colour,
                 n_aux: int = 0) -> tuple[str, list[tuple[int, int, str]]]:
    """The expression with magnets, colour word and aux dots appended; (start, end, role) of each."""
    words = {w.lower() for w in _WORD.findall(expression)}
    appended = [(w, "magnet") for w in MAGNET_WORDS[:magnets]]
    if colour:
        appended.append((next((c for c in COLOUR_WORDS if c not in words), COLOUR_WORDS[0]), "magnet"))
    appended += [(".", "aux")] * n_aux
    prompt, spans = expression.strip(), []
    for word, role in appended:
        prompt += " "
        spans.append((len(prompt), len(prompt) + len(word), role))
        prompt += word
    return prompt, spans


def token_roles(tokenizer, prompt: str, expression_end: int, spans, stopwords, max_length: int,
                target: str = DEFAULTS.target) -> tuple[list[str], list[str], int]:
    """(role per token position, token text per position, number of real tokens) for `prompt`.

    Positions are those of the encoder input padded to `max_length`.  Roles: special (BOS/SOT,
    EOS/EOT), padding (everything after the first EOS), magnet/aux (appended words), and for the
    expression's words content or stop (stop-word list; punctuation counts as stop).  With
    target="head" only the head noun stays "content"; the other content words become "stop".
    """
    encoded = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=False,
                        return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if len(ids) > max_length:
        raise UserInputError(
            f"The expression is too long: with the appended magnet words it needs {len(ids)} text "
            f"tokens and this model reads at most {max_length}; shorten it."
        )
    char_role = ["stop"] * expression_end
    char_word = [-1] * len(prompt)
    for index, m in enumerate(_WORD.finditer(prompt[:expression_end])):
        role = "stop" if m.group().lower() in stopwords else "content"
        char_role[m.start():m.end()] = [role] * (m.end() - m.start())
        char_word[m.start():m.end()] = [index] * (m.end() - m.start())
    char_role += ["space"] * (len(prompt) - expression_end)
    for start, end, role in spans:
        char_role[start:end] = [role] * (end - start)
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id} - {None}
    roles, texts, words, ended, n_real = [], [], [], False, 0
    pieces = tokenizer.convert_ids_to_tokens(ids)
    for token_id, (start, end), piece in zip(ids, offsets, pieces):
        if ended:
            roles.append("padding")
        elif token_id in specials or end <= start:
            roles.append("special")
            ended = token_id == tokenizer.eos_token_id
        else:
            role = next((char_role[c] for c in range(start, end) if char_role[c] != "space" and not prompt[c].isspace()), "stop")
            roles.append("stop" if role == "space" else role)
        words.append(char_word[start] if not ended and end > start else -1)
        if not roles[-1] == "padding":
            n_real += 1
        texts.append(piece.replace("</w>", "").replace("▁", "") or piece)
    if target == "head":
        roles = _head_only(roles, words)
    return roles, texts, n_real


def _head_only(roles: list[str], words: list[int]) -> list[str]:
    """Keep as "content" only the tokens of the head word, the last content word before the first
    stop word that follows content (a parser-free heuristic: "the man in red" -> "man"); the other
    content tokens become "context" (still in the normaliser, never in the heatmap)."""
    head = None
    for role, word in zip(roles, words):
        if role == "content":
            head = word
        elif role == "stop" and head is not None:
            break
    if head is None:
        return roles
    return [("context" if r == "content" and w != head else r) for r, w in zip(roles, words)]


# --------------------------------------------------------------------------- the forward pass


def _param(module: torch.nn.Module) -> torch.Tensor:
    """One parameter (its device and dtype; `.device`/`.dtype` of diffusers models walk them all)."""
    return next(module.parameters())


def _check_backbone(pipe) -> backbones.Backbone:
    return backbones.require(pipe, SUPPORTED, "Segment by text")


def _working_size(image: Image.Image, long_side: int, multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((w, h) of the resized content, (W, H) padded to `multiple`)."""
    scale = long_side / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    pw, ph = -(-w // multiple) * multiple, -(-h // multiple) * multiple
    return (w, h), (pw, ph)


def _pixels(images: list[Image.Image], content: tuple[int, int], padded: tuple[int, int], device, dtype) -> torch.Tensor:
    arrays = []
    for image in images:
        a = np.asarray(image.convert("RGB").resize(content, Image.BICUBIC), dtype=np.float32)
        a = np.pad(a, ((0, padded[1] - content[1]), (0, padded[0] - content[0]), (0, 0)), mode="edge")
        arrays.append(a)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return x.to(device=device, dtype=dtype)


@dataclass
class _Text:
    embeds: torch.Tensor
    pooled: torch.Tensor | None
    text_ids: torch.Tensor | None
    roles: list[str]
    texts: list[str]
    text_part: slice | None


def _encode(pipe, backbone, prompt, expression_end, spans, stopwords, settings, device) -> _Text:
    """The prompt encoded once, with the role of every key position of the chosen text segments.

    Trimmable segments (T5) are cut to the real tokens with `t5_length="trimmed"`; with several
    segments (SD3: CLIP then T5) `settings.text_part` picks "clip", "t5" or "both"."""
    parts, lengths = [], {}
    for segment, tokenizer, length in backbone.text_layout(pipe).segments:
        roles, texts, n_real = token_roles(tokenizer, prompt, expression_end, spans, stopwords, length,
                                           settings.target)
        if segment.trimmable and settings.t5_length == "trimmed":
            length, roles, texts = n_real, roles[:n_real], texts[:n_real]
        lengths[segment.name] = length
        parts.append((segment.name, roles, texts, length))
    with torch.no_grad():
        encoded = backbone.encode_text(pipe, prompt, device, lengths)
    if len(parts) == 1:
        _, roles, texts, _ = parts[0]
        return _Text(encoded.embeds, encoded.pooled, encoded.text_ids, roles, texts, None)
    roles, texts, start, stop, offset = [], [], None, None, 0
    for name, part_roles, part_texts, length in parts:
        if settings.text_part in ("both", name):
            roles += part_roles
            texts += part_texts
            start = offset if start is None else start
            stop = offset + length
        offset += length
    return _Text(encoded.embeds, encoded.pooled, encoded.text_ids, roles, texts, slice(start, stop))


def _cached_encoder(pipe, backbone) -> Callable:
    """`_encode` for this pipeline behind an LRU cache keyed on everything the encoding reads."""
    with _TEXT_CACHES_LOCK:
        encoder = _TEXT_CACHES.get(pipe)
        if encoder is None:
            pipe_ref = weakref.ref(pipe)  # the cache must not keep the model alive

            @functools.lru_cache(maxsize=8)
            def encoder(prompt, expression_end, spans, stopwords, t5_length, text_part, target, device):
                chosen = DEFAULTS.replace(t5_length=t5_length, text_part=text_part, target=target)
                return _encode(pipe_ref(), backbone, prompt, expression_end, list(spans), stopwords, chosen, device)

            _TEXT_CACHES[pipe] = encoder
        return encoder


def _forward(pipe, backbone, pixels, text: _Text, settings, controller, generator) -> None:
    """One noisy forward of the denoiser on VAE latents of `pixels`, stopped after the last layer."""
    denoiser = models.denoiser(pipe)
    device, dtype = pixels.device, _param(denoiser).dtype
    with torch.no_grad():
        latents = backbone.encode_latents(pipe, pixels, dtype)
        noise = torch.randn((1, *latents.shape[1:]), generator=generator, dtype=torch.float32)
        noise = noise.to(device=device, dtype=dtype).expand_as(latents)
        encoded = backbones.EncodedText(text.embeds, text.pooled, text.text_ids)
        controller.reset_forward()
        try:
            backbone.noisy_forward(pipe, latents, noise, encoded, sigma=settings.sigma,
                                   timestep=settings.timestep, guidance=settings.guidance)
        except StopForward:
            pass


# --------------------------------------------------------------------------- maps and masks


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 `values` (OpenCV's algorithm: pixels > t are foreground)."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    levels = np.arange(256, dtype=np.float64)
    q1 = np.cumsum(p)
    q2 = 1.0 - q1
    cum_mu = np.cumsum(levels * p)
    mu = cum_mu[-1]
    eps = np.finfo(np.float32).eps
    valid = (np.minimum(q1, q2) >= eps) & (np.maximum(q1, q2) <= 1.0 - eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1 = cum_mu / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) ** 2
    sigma = np.where(valid, sigma, -1.0)
    return int(np.argmax(sigma)) if sigma.max() > 0 else 0


def heat_to_mask(heat: np.ndarray, threshold: str | float = DEFAULTS.threshold,
                 component: bool = DEFAULTS.component) -> tuple[np.ndarray, float]:
    """A bool mask of the same shape and the threshold used (in [0, 1])."""
    values = np.uint8(np.clip(np.round(heat * 255), 0, 255))
    if threshold == OTSU:
        level = otsu_threshold(values)
    else:
        level = int(np.clip(np.round(float(threshold) * 255), 0, 254))
    mask = values > level
    if component and mask.any():
        _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        peak = np.unravel_index(int(np.argmax(np.where(mask, heat, -np.inf))), heat.shape)
        mask = labels == labels[peak]
    return mask, level / 255.0


def _to_image_maps(grid_maps: torch.Tensor, padded: tuple[int, int], content: tuple[int, int],
                   out_size: tuple[int, int], smooth: bool) -> np.ndarray:
    """(N, h, w) grid maps -> (N, H, W) float32 [0, 1] at the image size, padding cropped."""
    x = grid_maps.float().cpu()
    if smooth:
        x = torch.from_numpy(np.stack([cv2.GaussianBlur(m.numpy(), (0, 0), 1.0, borderType=cv2.BORDER_REPLICATE) for m in x]))
    x = F.interpolate(x[:, None], size=(padded[1], padded[0]), mode="bilinear", align_corners=False)
    x = x[..., : content[1], : content[0]]
    x = F.interpolate(x, size=(out_size[1], out_size[0]), mode="bilinear", align_corners=False)[:, 0]
    low = x.amin(dim=(1, 2), keepdim=True)
    high = x.amax(dim=(1, 2), keepdim=True)
    return ((x - low) / (high - low).clamp_min(1e-12)).numpy().astype(np.float32)


def _validate(pipe, expression, settings: GroundingSettings, stopwords) -> backbones.Backbone:
    """The backbone, after the checks that need the model or the expression (the settings' own
    values are checked by `GroundingSettings.validated()` when a public function takes them)."""
    backbone = _check_backbone(pipe)
    if not isinstance(expression, str) or not expression.strip():
        raise UserInputError("Please enter an expression that names the object, e.g. 'the dog on the left'.")
    words = [w.lower() for w in _WORD.findall(expression)]
    if not words:
        raise UserInputError("The expression has no words; use letters or digits.")
    if all(w in stopwords for w in words):
        raise UserInputError("The expression has only stop words (like 'the', 'of'); name the object, e.g. 'the red car'.")
    if settings.refine and backbone.unet_depth(models.denoiser(pipe)) is None:
        raise UserInputError("Refinement by self-attention propagation is available on SD UNet models only.")
    return backbone


def default_renorm(backbone: backbones.Backbone) -> bool:
    """Whether rows are renormalised over the word columns when the settings leave it open:
    on the paper's backbones (FLUX, SD3), off on UNets (measured; see `GroundingSettings.renorm`)."""
    return backbone in PAPER_BACKBONES


@models.one_call_at_a_time
def _heatmaps(pipe, images: list[Image.Image], expression: str, settings: GroundingSettings, stopwords):
    """Grid heatmaps of a batch of images: (heat (b, h, w), token maps (b, T, h, w), info)."""
    backbone = _validate(pipe, expression, settings, stopwords)
    denoiser = models.denoiser(pipe)
    device = _param(denoiser).device
    n_aux = settings.n_aux if settings.gas == "redirect" else 0
    prompt, spans = build_prompt(expression, settings.magnets, settings.colour, n_aux)
    expression_end = len(expression.strip())
    text = _cached_encoder(pipe, backbone)(prompt, expression_end, tuple(spans), stopwords, settings.t5_length,
                                          settings.text_part, settings.target, device)
    roles = text.roles
    roles_array = np.array(roles)
    content = torch.from_numpy(roles_array == "content")
    if not content.any():
        raise UserInputError("No word of the expression reached the model as a content token; name the object.")
    words = torch.from_numpy(np.isin(roles_array, ("content", "context", "stop", "magnet")))
    target = content if settings.filter_magnets else words
    among = words
    visible = torch.from_numpy(roles_array != "padding")
    candidates = visible
    aux = torch.from_numpy(roles_array == "aux")

    # FLUX/SD3: the paper's 1024; UNets: the model's own size (512 for SD 1.5, 64 for ours).
    size = settings.size or (PAPER_SIZE if backbone in PAPER_BACKBONES else max(models.default_size(pipe)))
    multiple = backbone.grid_multiple(pipe)
    size = max(multiple, size // multiple * multiple)
    content_wh, padded = _working_size(images[0], size, multiple)
    pixels = _pixels(images, content_wh, padded, device, pipe.vae.dtype)
    latent_side = min(padded) // getattr(pipe, "vae_scale_factor", 8)
    layers, refine_layers = _layers(denoiser, backbone, settings, latent_side)
    renorm = default_renorm(backbone) if settings.renorm is None else settings.renorm

    def make(gas_mode, suppress):
        return RefAMCapture(
            layers, target=target, among=among, visible=visible, candidates=candidates, text_part=text.text_part,
            norm=settings.norm, gas_mode=gas_mode, l_gas=settings.l_gas, tau_mass=settings.tau_mass,
            tau_cv=settings.tau_cv, renorm=renorm, suppress_keys=suppress,
            refine_layers=refine_layers, early_exit=settings.early_exit, state=ControlState(("cond",)),
        )

    suppress = None
    if settings.gas in ("suppress", "redirect"):  # first pass: observe and find the sinks
        observer = make("exclude", None)
        with attach(denoiser, observer):
            _forward(pipe, backbone, pixels, text, settings, observer, torch.Generator().manual_seed(settings.seed))
        suppress = observer.sink_columns()
        suppress = None if suppress is None else suppress & ~aux
    controller = make("exclude" if settings.gas == "exclude" else ("none" if settings.gas == "none" else settings.gas), suppress)
    generator = torch.Generator().manual_seed(settings.seed)
    with attach(denoiser, controller):
        for _ in range(settings.n_noise):
            _forward(pipe, backbone, pixels, text, settings, controller, generator)
    heat = controller.heat()
    if settings.refine:
        heat = _propagate(heat, controller, settings.refine_steps)
    sink_cols = controller.sink_columns() if suppress is None else suppress
    sinks = [] if sink_cols is None else sorted({text.texts[j] for j in torch.nonzero(sink_cols & visible).flatten().tolist()})
    info = dict(fam=backbone.name, renorm=renorm, prompt=prompt, roles=roles, texts=text.texts, visible=visible, content_wh=content_wh,
                padded=padded, layers=sorted(layers), sinks=sinks, suppressed=None if suppress is None else int(suppress.sum()))
    return heat, controller.token_maps(), info


_LAYER_CACHE: dict[tuple, tuple] = {}


def _layers(denoiser, backbone, settings: GroundingSettings, latent_side: int) -> tuple[dict[str, float], list[str]]:
    """Captured layers {name: depth} and refinement layers, cached per model and settings.

    UNet levels: `settings.unet_levels`, or when None the levels whose token grid is 16 to 48
    cells per side at this latent size (`auto_unet_levels`: SD 1.5 at 512 px gets the paper's
    levels 1 and 2)."""
    names = attention_layer_names(denoiser)
    unet_depth = backbone.unet_depth(denoiser)
    levels = settings.unet_levels
    if levels is None:
        levels = auto_unet_levels(names, latent_side, unet_depth) if unet_depth is not None else (1, 2)
    key = (id(denoiser), settings.depth, settings.blocks, levels, settings.refine)
    cached = _LAYER_CACHE.get(key)
    if cached is not None and cached[0] is denoiser:
        return cached[1], cached[2]
    layers = choose_layers(names, settings.depth, settings.blocks, levels, unet_depth)
    if not layers:
        raise UserInputError("These layer settings select no attention layer of this model.")
    refine_layers = self_attention_layers(names, min(levels), unet_depth) if settings.refine else []
    if len(_LAYER_CACHE) >= 16:
        _LAYER_CACHE.clear()
    _LAYER_CACHE[key] = (denoiser, layers, refine_layers)
    return layers, refine_layers


def _propagate(heat: torch.Tensor, controller: RefAMCapture, steps: int) -> torch.Tensor:
    """Heat diffused along the mean self-attention of the refinement layers: h <- A h, `steps` times."""
    found = controller.self_attention()
    if found is None:
        return heat
    attention, grid = found
    b = heat.shape[0]
    x = F.interpolate(heat[:, None], size=grid, mode="bilinear", align_corners=False).reshape(b, -1, 1)
    for _ in range(steps):
        x = attention @ x
    x = x.reshape(b, 1, *grid)
    return F.interpolate(x, size=heat.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def _params(pipe, expression, settings, info, extra=None) -> dict:
    return {
        "task": "segment",
        "model": pipe.name_or_path or type(pipe).__name__,
        "expression": expression,
        "prompt": info["prompt"],
        "layers": info["layers"],
        "working_size": list(info["padded"]),
        **asdict(settings),
        "renorm": info["renorm"],  # as used (the settings' None means the backbone's default)
        **(extra or {}),
    }


def segment_image(pipe, image, expression: str, settings: GroundingSettings | None = None, **overrides) -> GroundingResult:
    """Segment the object `expression` refers to in `image` (path, PIL image or array).

    `settings` (default: the model's, `GroundingSettings.for_model(pipe)`: the defaults below, or
    the values measured for the built-in model) and keyword overrides of its fields
    (`segment_image(pipe, image, text, size=512, gas="none")`) set every parameter; an unknown
    name is a TypeError.  Raises UserInputError for anything the user can get wrong.
    """
    settings = (settings or GroundingSettings.for_model(pipe)).replace(**overrides).validated()
    image = load_image(image)
    stopwords = load_stopwords()
    heat, token_maps, info = _heatmaps(pipe, [image], expression, settings, stopwords)
    heatmap = _to_image_maps(heat, info["padded"], info["content_wh"], image.size, settings.smooth)[0]
    visible_idx = torch.nonzero(info["visible"]).flatten().tolist()
    tokens = [(info["texts"][j], info["roles"][j]) for j in visible_idx]
    maps = _to_image_maps(token_maps[0], info["padded"], info["content_wh"], image.size, settings.smooth)
    extra = {}
    if settings.sam2:
        mask, extra = sam2_mask(load_sam2(settings.sam2), image, heatmap, settings.sam2_selection,
                                settings.sam2_points, settings.sam2_negatives)
        level = float("nan")
    else:
        mask, level = heat_to_mask(heatmap, settings.threshold, settings.component)
    return GroundingResult(image=image, heatmap=heatmap, mask=mask, tokens=tokens, token_maps=maps,
                           sinks=info["sinks"], threshold=level,
                           params=_params(pipe, expression, settings, info, extra))


def temporal_smooth(heatmaps: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` frames (edges use the frames that exist)."""
    if window <= 1 or len(heatmaps) < 2:
        return heatmaps
    half = window // 2
    out = np.empty_like(heatmaps)
    for i in range(len(heatmaps)):
        out[i] = heatmaps[max(0, i - half): i + half + 1].mean(0)
    return out


def segment_video(pipe, video, expression: str, settings: GroundingSettings | None = None,
                  max_frames: int | None = MAX_FRAMES, progress=None, **overrides) -> VideoGroundingResult:
    """One mask per frame of `video` (a path or a list of frames), with temporally smoothed heatmaps.

    `settings` and keyword overrides of its fields as in `segment_image`; `max_frames`: read at
    most this many frames of a video file (None: all).  Stopped on request
    (`pipelines.stopping`) after some frames, it returns those frames (params["stopped_at_frame"]);
    before the first batch it raises `Stopped`."""
    settings = (settings or GroundingSettings.for_model(pipe)).replace(**overrides).validated()
    if settings.sam2:
        raise UserInputError("SAM2 prompting is available for images only; video masks come from the heatmaps.")
    if isinstance(video, (list, tuple)):
        if not video:
            raise UserInputError("The video has no frames.")
        frames, fps = [load_image(f, "video frame") for f in video], 8.0
    else:
        frames, fps = read_video(video, max_frames=max_frames)
        frames = [load_image(f, "video frame") for f in frames]
    stopwords = load_stopwords()
    _validate(pipe, expression, settings, stopwords)
    size = frames[0].size
    heats, info = [], None
    batches = range(0, len(frames), settings.batch_frames)
    iterator = pipe.progress_bar(batches) if hasattr(pipe, "progress_bar") else batches
    extra = {"fps": fps}
    for start in iterator:
        batch = [f if f.size == size else f.resize(size) for f in frames[start:start + settings.batch_frames]]
        try:
            heat, _, info = _heatmaps(pipe, batch, expression, settings, stopwords)
        except Stopped:  # asked to stop (pipelines.stopping): keep the frames done, if any
            if not heats:
                raise
            extra.update(stopped_at_frame=start, frames_read=len(frames))
            frames = frames[:start]
            break
        heats.append(_to_image_maps(heat, info["padded"], info["content_wh"], size, settings.smooth))
    heatmaps = temporal_smooth(np.concatenate(heats), settings.temporal_window)
    masks = np.stack([heat_to_mask(h, settings.threshold, settings.component)[0] for h in heatmaps])
    return VideoGroundingResult(frames=frames, heatmaps=heatmaps, masks=masks, fps=fps,
                                params=_params(pipe, expression, settings, info, extra))


# --------------------------------------------------------------------------- SAM2 point prompts

_SAM2_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as SAM2's image processor uses
_SAM2_STD = (0.229, 0.224, 0.225)
_SAM2_CACHE: dict[str, object] = {}


def heatmap_points(heat: np.ndarray, k: int = DEFAULTS.sam2_points, negatives: int = DEFAULTS.sam2_negatives,
                   min_distance: float = 0.05):
    """(points (n, 2) as (x, y) pixels, labels (n,) 1/0): the top-k peaks of `heat` with
    non-maximum suppression (peaks closer than `min_distance` x the diagonal are skipped), then
    `negatives` points at the lowest-heat locations, equally spaced apart the same way."""
    h, w = heat.shape
    radius = min_distance * float(np.hypot(h, w))

    def pick(values: np.ndarray, n: int) -> list[tuple[int, int]]:
        chosen: list[tuple[int, int]] = []
        for index in np.argsort(-values, axis=None, kind="stable"):
            y, x = divmod(int(index), w)
            if all(np.hypot(x - cx, y - cy) >= radius for cx, cy in chosen):
                chosen.append((x, y))
                if len(chosen) == n:
                    break
        return chosen

    positives = pick(heat, k)
    negative = pick(-heat, negatives) if negatives else []
    points = np.array(positives + negative, dtype=np.float32).reshape(-1, 2)
    labels = np.array([1] * len(positives) + [0] * len(negative), dtype=np.int64)
    return points, labels


def select_mask(masks: np.ndarray, scores: np.ndarray, heat: np.ndarray, rule: str = DEFAULTS.sam2_selection) -> int:
    """Index of the chosen mask among SAM2's multimask outputs: by SAM2's predicted IoU
    ("sam_score"), by IoU with the heatmap thresholded at 0.5 ("heatmap_iou"), or their product."""
    hot = heat >= 0.5
    ious = np.array([(m & hot).sum() / max(1, (m | hot).sum()) for m in masks])
    value = {"sam_score": scores, "heatmap_iou": ious, "product": scores * ious}[rule]
    return int(np.argmax(value))


def load_sam2(source):
    """A transformers `Sam2Model` from a local folder or a cached hub id (never downloaded)."""
    if not isinstance(source, str):
        return source  # already a model (tests, Python users)
    if source not in _SAM2_CACHE:
        from transformers import Sam2Model

        try:
            _SAM2_CACHE[source] = Sam2Model.from_pretrained(source, local_files_only=True).eval()
        except Exception as error:  # OSError, ValueError: missing or incompatible files
            if out_of_memory_message(error) is not None:
                raise  # not a missing model: the request's handler says what to lower (pipelines.errors)
            raise UserInputError(
                f"No SAM2 model at '{source}': pass a local folder or an already downloaded id such as "
                "facebook/sam2.1-hiera-large, or leave SAM2 off to threshold the heatmap."
            ) from error
    return _SAM2_CACHE[source]


def sam2_mask(model, image: Image.Image, heat: np.ndarray, selection: str = DEFAULTS.sam2_selection,
              points: int = DEFAULTS.sam2_points, negatives: int = DEFAULTS.sam2_negatives) -> tuple[np.ndarray, dict]:
    """SAM2's mask for point prompts taken from `heat` (image-sized), and what was used.

    Preprocessing follows SAM2's image processor (resize to the model's square input, ImageNet
    normalisation; done here because transformers' processor needs torchvision), and the
    low-resolution logits are resized to the image and thresholded at 0.
    """
    side = int(model.config.prompt_encoder_config.image_size)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixels = np.asarray(image.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
    pixels = (pixels - np.array(_SAM2_MEAN, np.float32)) / np.array(_SAM2_STD, np.float32)
    pixel_values = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device, dtype)
    xy, labels = heatmap_points(heat, points, negatives)
    scale = np.array([side / image.width, side / image.height], dtype=np.float32)
    input_points = torch.from_numpy(xy * scale)[None, None].to(device, dtype)
    input_labels = torch.from_numpy(labels)[None, None].to(device)
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_points=input_points, input_labels=input_labels,
                    multimask_output=True)
    logits = out.pred_masks[0, 0].float()  # (3, h, w)
    logits = F.interpolate(logits[None], size=(side, side), mode="bilinear", align_corners=False)
    logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
    masks = (logits > 0).cpu().numpy()
    scores = out.iou_scores[0, 0].float().cpu().numpy()
    chosen = select_mask(masks, scores, heat, selection)
    extra = {"sam2_points": xy.tolist(), "sam2_labels": labels.tolist(), "sam2_scores": scores.tolist(),
             "sam2_score": float(scores[chosen]), "sam2_choice": chosen}
    return masks[chosen], extra


# --------------------------------------------------------------------------- RefCOCO-like folders


@dataclass
class RefSample:
    id: str  # "<sample id>_<expression index>"
    image: Path
    expression: str
    mask: Path | None


def read_refseg_folder(folder: str | Path) -> list[RefSample]:
    """Samples of a RefCOCO-like folder, one per expression.

    Layout (documented in benchmarks/refseg.py)::

        FOLDER/expressions.json   {"samples": [{"id": "0001", "image": "images/0001.png",
                                                 "mask": "masks/0001.png",
                                                 "expressions": ["the red circle", "..."]}, ...]}
        FOLDER/images/...         the images
        FOLDER/masks/...          one binary mask (white = object) per referred object (optional)
    """
    folder = Path(folder)
    index = folder / "expressions.json"
    if not index.is_file():
        raise UserInputError(f"'{folder}' has no expressions.json; see benchmarks/refseg.py for the folder layout.")
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))["samples"]
        samples = []
        for entry in entries:
            mask = folder / entry["mask"] if entry.get("mask") else None
            for k, expression in enumerate(entry["expressions"]):
                samples.append(RefSample(f"{entry['id']}_{k}", folder / entry["image"], str(expression), mask))
    except (ValueError, KeyError, TypeError) as error:
        raise UserInputError(f"'{index}' is not a valid expressions file (see benchmarks/refseg.py): {error}.") from error
    if not samples:
        raise UserInputError(f"'{index}' lists no expressions.")
    return samples
