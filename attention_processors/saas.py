"""SaaS (self-adaptive attention scaling, ICCV 2025, arXiv 2507.16240) for multi-part instructions.

The problem: in an instruction with several sub-instructions ("make the bike rusty, and add a
graffiti on the wall, and make the weather rainy") some parts are ignored, because their text
attention loses against the tokens of the input image.  The fix, training-free and without extra
forward passes: at step t, take a spatial mask B_k and a gain lambda_k per sub-instruction from
step t-1's attention, and multiply the attention of the queries inside B_k on the tokens of part k
by SCALE * lambda_k (renormalising every row), which is adding log(SCALE * lambda_k) to those
logits before the softmax.  The spec this module implements is docs/methods/instruction.md
(the project's own account, with the paper defaults and our deviations).

What is the paper's and what is ours:

- **Paper (OmniGen v1, spec sections 2-5)**: `SaaSOmniGenProcessor`, `SaaSOmniGenState`,
  `install_omnigen`: capture of output-image queries x (input-image keys, span keys) in layers
  8-31, steps BEGIN <= i < THRE; Gaussian blur (sigma 1, 7x7), min-max, Otsu on the 8-bit map;
  lambda_k = sum_{B_k} M_img / (sum_{B_k} M_k + 1e-6) (`gain_mode="paper"`); rescale of the cond
  row's output queries in layers 8-31 at steps BEGIN < i <= THRE.  Defaults: `PAPER_DEFAULTS`.
- **Ours, everything SD-family (spec sections 6-7)**: `SaaSController` on UNet ``attn2``
  (InstructPix2Pix, multi-part text-to-image), the layer levels, the ``equalize`` / ``fixed`` /
  ``sink_ratio`` gain modes (the image enters IP2P by channel concatenation, so the paper's
  competitor, image tokens, has no counterpart; in ``sink_ratio`` CLIP's start-of-text token
  plays its role), g_max = 3 and the 0.4 * T window.  Defaults: `SD_DEFAULTS`.
- **Ours, FLUX Kontext** (a second backbone beyond the paper): `SaaSFluxKontextProcessor`,
  `SaaSFluxKontextState`, `install_flux_kontext`: the paper's mechanism on Kontext's joint
  sequence [T5 text, noisy latents, reference-image latents] in dual- and single-stream blocks,
  the reference tokens playing the paper's input-image role (the competitor of its gain rule).
  OmniGen's and Kontext's states share one implementation (`_JointSequenceSaaSState`); only the
  layout each reads from its transformer's inputs differs.
- **Ours, everywhere**: sub-instruction spans from the text's character ranges with a decode
  assertion instead of the reference code's fixed token offsets (`clip_spans`, `offset_spans`); Otsu, blur and masks in torch
  on the device; group masses by SDPA with one-hot indicator values (OmniGen) instead of an eager
  softmax; one explicit state object per call (no environment variables, no global dicts).

The feedback loop (`SaaSLoop`, shared by both families): per step, the captured per-query maps
(a reference group, then one map per part) are summed over layers (per token grid, resized once:
`grids.GridSums`); at the step boundary (the first forward of the next step) they become masks
and gains for the next step, and one diagnostics entry (`SaaSLoop.history`).  The masses are
measured *after* that step's rescale (spec 3.2), so the gain of step t is the ratio that remains
after the boost of step t-1.

Untouched rows stay bit-identical: the stock attention runs for the whole batch as it would
without SaaS, and only the measured rows (their output-image queries on OmniGen) are recomputed
with the log-gain bias and spliced in.  (A biased SDPA over the whole batch could pick another
kernel and change the other rows by rounding.)  With no mask at all the stock path runs alone.

torch.compile (every family): eagerly a layer branches on the step in Python; inside a compiled
graph (`torch.compiler.is_compiling()`) it computes every branch at every step and picks by 0-d
flag tensors, reading masks, gains or biases from buffers and adding its capture, times a flag,
into a buffer on the mask grid.  The eager per-forward code (`SaaSController.begin_forward`; the
joint-sequence states' `begin_forward`, called by the install functions' pre-hooks) refreshes
those buffers in place and hands the captured sums to `SaaSLoop` between forwards, so one graph
serves every step.  See `SaaSController` and `_JointSequenceSaaSState`.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from . import layers as _layers
from .core import AttentionCall, AttentionController, ControlState, combine_masks, fused_attention
from .grids import GridSums, grid_maps, mask_to_tokens, resize_to_grid
from .processors import flux_projections

# ----------------------------------------------------------------------------- defaults


@dataclass(frozen=True)
class PaperDefaults:
    """The paper's settings (released code and README, spec section 5), in one place.

    capture_layers / scale_layers: OmniGen layer indices (code: capture 8-31 hard-coded; the
    README sets scale_layers 8-31, the code default is none).  begin / thre: the step window of
    50 steps (README 0 / 20; code default THRE = 50).  blur: sigma 1, 7x7.  gain_eps: the gain's
    denominator guard.  Sampling: 50 steps, 512 px, text guidance 2.5, image guidance 1.6, seed 42.
    """

    capture_layers: tuple[int, ...] = tuple(range(8, 32))
    scale_layers: tuple[int, ...] = tuple(range(8, 32))
    scale: float = 1.0
    begin: int = 0
    thre: int = 20
    steps: int = 50
    mask_threshold: str = "auto"
    blur_sigma: float = 1.0
    blur_size: int = 7
    gain_eps: float = 1e-6
    gain_mode: str = "paper"
    size: int = 512
    guidance_scale: float = 2.5
    img_guidance_scale: float = 1.6
    seed: int = 42


@dataclass(frozen=True)
class SDDefaults:
    """Our extrapolation to SD-family UNets (spec sections 6-7); none of it is the paper's.

    gain_mode "equalize" with g_max 3 (SOT holds most of SD's cross-attention mass, so an
    uncapped ratio would be extreme); window: steps 1..ceil(0.4 T) rescale (the paper's 20/50);
    levels: UNet levels (grid = latent / 2^level) of the ``attn2`` layers, see `default_levels`;
    IP2P pipeline defaults 100 steps, text guidance 7.5, image guidance 1.5.
    """

    gain_mode: str = "equalize"
    g_max: float = 3.0
    window_fraction: float = 0.4
    sd15_levels: tuple[int, ...] = (1, 2)  # 32x32 and 16x16 at 512 px (down_blocks.1/2, up_blocks.1/2)
    sdxl_levels: tuple[int, ...] = (2,)  # 32x32 at 1024 px (down_blocks.2, mid_block, up_blocks.0)
    small_unet_levels: tuple[int, ...] = (0, 1)  # builtin / tiny: the two cross-attention levels
    ip2p_steps: int = 100
    ip2p_guidance_scale: float = 7.5
    ip2p_image_guidance_scale: float = 1.5


PAPER_DEFAULTS = PaperDefaults()
SD_DEFAULTS = SDDefaults()

GAIN_MODES = ("paper", "equalize", "fixed", "sink_ratio")

#: Sub-instruction separators (spec 3.1): a comma, optionally followed by "and", or a semicolon.
SEPARATOR = r"\s*(?:,|;)\s*(?:and\s+)?"
#: The same plus a bare " and " between parts (spec 6, SD modes; our option `split_and=True`).
SEPARATOR_WITH_AND = SEPARATOR + r"|\s+and\s+"
_TRAILING = ".!?"


def _user_error(message: str) -> Exception:
    from pipelines.errors import UserInputError  # imported late: attention_processors sits below pipelines

    return UserInputError(message)


# ----------------------------------------------------------------------------- spans


def split_instruction(text: str, split_and: bool = False) -> list[tuple[int, int]]:
    """Character ranges (start, end) of the sub-instructions of `text`, in order (spec 3.1).

    Parts are separated by ``,`` (optionally followed by "and") or ``;``; with `split_and` also
    by a bare " and " (spec 6 for the SD modes; off by default because "black and white" is one
    part).  Each range is trimmed of whitespace and of a trailing ``.``/``!``/``?`` (punctuation
    carries no content to boost).  Empty parts are KEPT as empty ranges (start == end) so that
    `validate_parts` can say which one is empty; a text without separators is one part.
    """
    pattern = re.compile(SEPARATOR_WITH_AND if split_and else SEPARATOR, flags=re.IGNORECASE)
    ranges, start = [], 0
    for match in pattern.finditer(text):
        ranges.append((start, match.start()))
        start = match.end()
    ranges.append((start, len(text)))
    trimmed = []
    for a, b in ranges:
        while a < b and text[a].isspace():
            a += 1
        while b > a and (text[b - 1].isspace() or text[b - 1] in _TRAILING):
            b -= 1
        trimmed.append((a, b))
    return trimmed


def validate_parts(text: str, parts: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `split_instruction`, or a `UserInputError` naming the first empty part."""
    if not text or not text.strip():
        raise _user_error("The instruction is empty; write one or more parts separated by commas.")
    for number, (a, b) in enumerate(parts, start=1):
        if b <= a:
            raise _user_error(f"Part {number} of the instruction is empty; remove the extra comma or write that part.")
    return list(parts)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def clip_spans(tokenizer, text: str, parts: Sequence[tuple[int, int]], max_length: int | None = None) -> list[slice]:
    """Token positions of each part in the padded CLIP ``input_ids`` of `text` (BOS at 0).

    Our CLIP tokenizer is the slow `CLIPTokenizer` (no offset mapping).  CLIP's BPE splits the
    text into words first and encodes each word on its own, so the tokens of ``text[:a]`` are a
    prefix of the tokens of `text` whenever ``a`` falls between words, which part boundaries
    always do: the span of part (a, b) is ``[1 + n(text[:a]), 1 + n(text[:b]))``.  Separators
    (``,``, "and") lie outside every span.  Each span is checked: it must decode back to its part
    (whitespace and case aside), else AssertionError (a tokenizer this reasoning does not hold
    for).  A part that does not fit in the window (`max_length`, default the tokenizer's, minus
    BOS and EOS) raises `UserInputError`.
    """
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(text, padding="max_length", max_length=max_length, truncation=True).input_ids

    def count(prefix: str) -> int:
        return len(tokenizer(prefix, add_special_tokens=False).input_ids)

    spans = []
    for number, (a, b) in enumerate(parts, start=1):
        if b <= a:
            raise _user_error(f"Part {number} of the instruction is empty; remove the extra comma or write that part.")
        start, stop = 1 + count(text[:a]), 1 + count(text[:b])
        if stop > max_length - 1:
            raise _user_error(f"Part {number} of the instruction lies past the {max_length - 2} text tokens this "
                              f"model reads; shorten the instruction.")
        decoded = tokenizer.decode(ids[start:stop])
        assert _squash(decoded) == _squash(text[a:b]), (
            f"part {number} {text[a:b]!r} decodes to {decoded!r} at token positions {start}..{stop - 1}")
        spans.append(slice(start, stop))
    return spans


def offset_spans(tokenizer, text: str, parts: Sequence[tuple[int, int]], ids: Sequence[int] | None = None,
                 what: str = "instruction") -> list[slice]:
    """Token positions of each part (a character range of `text`) in the ids a pipeline gives its
    encoder for `text` (`ids`; default: the tokenizer's own encoding), from the tokenizer's offset
    mapping (a fast tokenizer, e.g. T5's): the tokens whose characters, leading whitespace aside,
    overlap the part.  Tokens at a span's ends that spell nothing (a lone "▁") are dropped.

    Checks, with AssertionError where a tokenizer breaks the reasoning: the encoding with offsets
    is a prefix of `ids` (what the encoder reads), and each span decodes back to its part
    (whitespace and case aside).  An empty part raises `UserInputError`.
    """
    encoded = tokenizer(text, return_offsets_mapping=True)
    own, offsets = list(encoded.input_ids), [tuple(o) for o in encoded.offset_mapping]
    if ids is not None:
        given = list(ids)[: len(own)]
        assert given == own, f"the encoder reads {given}, the offsets belong to {own}"
    spans = []
    for number, (a, b) in enumerate(parts, start=1):
        if b <= a:
            raise _user_error(f"Part {number} of the {what} is empty; remove the extra comma or write that part.")
        spans.append(part_tokens(tokenizer, own, offsets, text, (a, b), f"part {number}"))
    return spans


def part_tokens(tokenizer, ids: Sequence[int], offsets: Sequence[tuple[int, int]], text: str,
                part: tuple[int, int], name: str = "part") -> slice:
    """The positions in `ids` of the tokens spelling `text[a:b]`, from their character `offsets`
    into `text`: the tokens whose characters, leading whitespace aside, overlap the part, without
    tokens at the ends that spell nothing (a lone "▁").  AssertionError unless the span decodes
    back to the part (whitespace and case aside; an unknown token reads as its characters)."""
    a, b = part
    inside = []
    for j, (s, e) in enumerate(offsets):
        while s < e and text[s].isspace():  # a "▁word" token's offsets may include its space
            s += 1
        if s < e and max(s, a) < min(e, b):
            inside.append(j)
    while inside and not _squash(tokenizer.decode(ids[inside[0] : inside[0] + 1])):
        inside.pop(0)
    while inside and not _squash(tokenizer.decode(ids[inside[-1] : inside[-1] + 1])):
        inside.pop()
    if not inside:
        raise AssertionError(f"no token of {name} {text[a:b]!r}")
    start, stop = inside[0], inside[-1] + 1
    decoded = _decode_with_unknowns(tokenizer, ids[start:stop], offsets[start:stop], text)
    assert _squash(decoded) == _squash(text[a:b]), (
        f"{name} {text[a:b]!r} decodes to {decoded!r} at token positions {start}..{stop - 1}")
    return slice(start, stop)


def _decode_with_unknowns(tokenizer, ids: Sequence[int], offsets: Sequence[tuple[int, int]], text: str) -> str:
    """`ids` decoded, with each unknown token (a character outside the vocabulary, e.g. T5's
    ``<unk>``) read back as the characters its offsets cover."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    pieces, run = [], []
    for token, (s, e) in zip(ids, offsets):
        if token == unknown:
            pieces += [tokenizer.decode(run), text[s:e]]
            run = []
        else:
            run.append(token)
    return "".join(pieces + [tokenizer.decode(run)])


# ----------------------------------------------------------------------------- maps, Otsu, gains


def gaussian_kernel(sigma: float = PAPER_DEFAULTS.blur_sigma, size: int = PAPER_DEFAULTS.blur_size) -> torch.Tensor:
    """Normalised 1-D Gaussian taps (size,), float32: the separable factor of the paper's blur."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float = PAPER_DEFAULTS.blur_sigma,
                  size: int = PAPER_DEFAULTS.blur_size) -> torch.Tensor:
    """Separable Gaussian blur of (..., h, w) maps in float32 (spec 3.3: sigma 1, 7x7).

    Border: reflection without repeating the edge (torch "reflect", OpenCV's default
    BORDER_REFLECT_101); grids with a side of size // 2 or less cannot reflect that far and use
    edge replication instead (our choice; such grids only occur in tests and tiny models).
    """
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w).float()
    pad = size // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    k = gaussian_kernel(sigma, size).to(x.device)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), k.view(1, 1, 1, size))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), k.view(1, 1, size, 1))
    return x.reshape(*lead, h, w)


def blur_minmax(maps: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Blurred maps min-max normalised to [0, 1] (spec 3.3 steps 2), and which are valid.

    maps: (..., h, w).  Returns (normalised (..., h, w) float32, valid (...) bool); a constant map
    (range <= eps after the blur) is not valid: it gives no mask (and its normalised map is 0).
    """
    blurred = gaussian_blur(maps)
    flat = blurred.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    span = hi - lo
    valid = span.squeeze(-1) > eps
    normed = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), torch.zeros_like(flat))
    return normed.reshape(blurred.shape), valid


def quantise8(map01: torch.Tensor) -> torch.Tensor:
    """The 8-bit levels (int64, 0..255) of maps in [0, 1]: floor(255 * m), what a uint8 cast of
    ``m * 255`` gives (the reference thresholds such an image)."""
    return (map01.float().clamp(0, 1) * 255).floor().long()


def otsu_threshold(map01: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold level (int64, ...) of (..., h, w) maps in [0, 1], in torch (spec 3.3).

    The map is quantised to 256 levels (`quantise8`); the level t maximising the between-class
    variance of {<= t} vs {> t} is returned (the first one on ties, as OpenCV).  The mask is
    ``quantise8(map) > t``.  A map with one level only gets t = 255 (empty mask).
    """
    lead, n = map01.shape[:-2], map01.shape[-2] * map01.shape[-1]
    q = quantise8(map01).reshape(-1, n)
    hist = torch.zeros(q.shape[0], 256, dtype=torch.float64, device=q.device)
    hist.scatter_add_(1, q, torch.ones_like(q, dtype=torch.float64))
    p = hist / n
    levels = torch.arange(256, dtype=torch.float64, device=q.device)
    omega = p.cumsum(-1)
    mu = (p * levels).cumsum(-1)
    mu_t = mu[:, -1:]
    denom = omega * (1 - omega)
    between = torch.where(denom > 1e-12, (mu_t * omega - mu) ** 2 / denom.clamp_min(1e-12),
                          torch.full_like(denom, -1.0))
    t = between.argmax(-1)  # the first maximum
    t = torch.where(between.amax(-1) < 0, torch.full_like(t, 255), t)
    return t.reshape(lead)


def part_masks(maps: torch.Tensor, threshold: str | float = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Masks B_k (..., h, w) bool of (..., h, w) part maps, and the thresholds used (spec 3.3).

    Blur + min-max (`blur_minmax`), then Otsu (``"auto"``, the paper's) or a fixed threshold in
    [0, 1] (a float).  A constant map gives an empty mask.  Thresholds are returned on the [0, 1]
    scale (Otsu's level / 255).
    """
    normed, valid = blur_minmax(maps)
    if threshold == "auto":
        level = otsu_threshold(normed)
        masks = quantise8(normed) > level[..., None, None]
        used = level.float() / 255
    else:
        used = torch.full(normed.shape[:-2], float(threshold), device=normed.device)
        masks = normed > float(threshold)
    return masks & valid[..., None, None], used


def compute_gains(mode: str, parts: torch.Tensor, masks: torch.Tensor, reference: torch.Tensor | None = None, *,
                  g_max: float | None = SD_DEFAULTS.g_max, gain: float | None = None,
                  eps: float = PAPER_DEFAULTS.gain_eps) -> tuple[torch.Tensor, torch.Tensor]:
    """Gains lambda_k (..., K) float32 and which parts are rescaled (..., K) bool.

    parts: (..., K, N) unblurred maps M_k; masks: (..., K, N) bool B_k; reference: (..., N), the
    competitor's map (OmniGen: the input-image tokens M_img; SD ``sink_ratio``: the SOT token).

    - ``paper`` (spec 3.3): lambda_k = sum_{B_k} M_ref / (sum_{B_k} M_k + eps), not clipped;
    - ``equalize`` (ours, spec 6): lambda_k = clip(max_j m_j / m_k, 1, g_max), m_k = mean of M_k
      over B_k, j over the parts that have a mask;
    - ``fixed`` (ours): lambda_k = gain;
    - ``sink_ratio`` (ours): the paper's ratio with SOT as the competitor, clipped to [1, g_max].

    A part with an empty mask (or, for the ratios, no reference mass in it) is not rescaled; its
    gain is reported as 1.
    """
    if mode not in GAIN_MODES:
        raise ValueError(f"unknown gain mode {mode!r}; use one of {', '.join(GAIN_MODES)}")
    parts, m = parts.float(), masks.float()
    active = masks.any(-1)
    if mode == "fixed":
        if gain is None or gain <= 0:
            raise ValueError("gain mode 'fixed' needs a positive gain")
        gains = torch.full(active.shape, float(gain), device=parts.device)
    elif mode == "equalize":
        mean = (parts * m).sum(-1) / m.sum(-1).clamp_min(1)
        best = torch.where(active, mean, torch.zeros_like(mean)).amax(-1, keepdim=True)
        gains = (best / mean.clamp_min(eps)).clamp(1.0, g_max if g_max is not None else math.inf)
    else:
        if reference is None:
            raise ValueError(f"gain mode {mode!r} needs the reference (competitor) map")
        ref = (reference.float().unsqueeze(-2) * m).sum(-1)
        gains = ref / ((parts * m).sum(-1) + eps)
        active = active & (ref > 0)
        if mode == "sink_ratio":
            gains = gains.clamp(1.0, g_max if g_max is not None else math.inf)
    return torch.where(active, gains, torch.ones_like(gains)), active


def log_gain_bias(masks_tok: torch.Tensor, gains: torch.Tensor, active: torch.Tensor, spans: Sequence[slice],
                  n_keys: int, scale: float = 1.0) -> torch.Tensor:
    """Additive logit bias (b, 1, N, n_keys) float32: log(scale * lambda_k) where query p is in
    B_k and key j in span k, 0 elsewhere (spec 3.4; a query in several masks gets each span's
    own bias).  masks_tok: (b, K, N) masks on the layer's tokens; gains, active: (b, K)."""
    indicator = span_indicator(spans, n_keys, masks_tok.device)  # (K, n_keys)
    log_g = torch.where(active, torch.log((gains.float() * scale).clamp_min(1e-30)), torch.zeros_like(gains.float()))
    weights = masks_tok.float() * log_g.unsqueeze(-1)  # (b, K, N)
    return (weights.transpose(1, 2) @ indicator).unsqueeze(1)


def span_indicator(groups: Sequence[slice | Sequence[slice]], n_keys: int, device=None,
                   pad_to: int = 1) -> torch.Tensor:
    """One-hot group indicators (G, n_keys) float32: row g is 1 on the keys of group g (a slice
    or several).  With `pad_to` the rows are padded with zeros to a multiple (SDPA-friendly
    value widths)."""
    rows = -(-len(groups) // pad_to) * pad_to
    ind = torch.zeros(rows, n_keys, device=device)
    for g, group in enumerate(groups):
        for s in (group if isinstance(group, (list, tuple)) else (group,)):
            ind[g, s] = 1
    return ind


def sd_window(num_steps: int, fraction: float = SD_DEFAULTS.window_fraction) -> tuple[int, int]:
    """(begin, thre) for a T-step SD run: rescale at steps 1..ceil(fraction * T) (spec 6, ours:
    the paper's 20 of 50)."""
    return 0, max(1, math.ceil(fraction * num_steps))


# ----------------------------------------------------------------------------- the feedback loop


class SaaSLoop:
    """The per-call SaaS feedback loop, independent of the backbone (spec 3.2-3.5).

    Group maps (b, N, G) of one layer call are `add`-ed per token grid during the capture steps
    begin <= i < thre; group 0 is the reference (competitor) group, groups 1..K the parts.  When
    the step advances (`advance`), the step's sums become part maps on `map_grid` (default: the
    finest captured grid), masks (`part_masks`), gains (`compute_gains`) and one `history` entry;
    masks and gains are then used by steps begin < i <= thre (`rescaling`).  `override` sets masks
    and gains directly (tests, ablations).

    window: (begin, thre) in steps.  scale: the paper's SCALE (the bias is log(scale * lambda)).
    """

    def __init__(self, n_parts: int, *, window: tuple[int, int] = (PAPER_DEFAULTS.begin, PAPER_DEFAULTS.thre),
                 scale: float = PAPER_DEFAULTS.scale, gain_mode: str = PAPER_DEFAULTS.gain_mode,
                 g_max: float | None = SD_DEFAULTS.g_max, gain: float | None = None,
                 mask_threshold: str | float = PAPER_DEFAULTS.mask_threshold, eps: float = PAPER_DEFAULTS.gain_eps,
                 map_grid: tuple[int, int] | None = None):
        begin, thre = window
        if n_parts < 1:
            raise ValueError("SaaS needs at least one sub-instruction span")
        if not 0 <= begin <= thre:
            raise ValueError(f"window {window}: need 0 <= begin <= thre")
        if scale <= 0:
            raise ValueError("scale must be positive")
        if gain_mode not in GAIN_MODES:
            raise ValueError(f"unknown gain mode {gain_mode!r}; use one of {', '.join(GAIN_MODES)}")
        if gain_mode == "fixed" and (gain is None or gain <= 0):
            raise ValueError("gain mode 'fixed' needs a positive gain")
        if mask_threshold != "auto" and not 0 <= float(mask_threshold) < 1:
            raise ValueError("mask_threshold is 'auto' (Otsu) or a number in [0, 1)")
        self.n_parts = n_parts
        self.begin, self.thre = int(begin), int(thre)
        self.scale, self.gain_mode, self.g_max, self.gain = float(scale), gain_mode, g_max, gain
        self.mask_threshold, self.eps, self.map_grid = mask_threshold, eps, map_grid
        self.sums = GridSums()
        self._sum_step: int | None = None
        self._calls = 0
        self.masks: torch.Tensor | None = None  # (b, K, h, w) bool, for the next step
        self.gains: torch.Tensor | None = None  # (b, K) float32
        self.active: torch.Tensor | None = None  # (b, K) bool
        self._any_active = False
        self.masks_from: int | None = None  # the step the current masks were measured at
        self.version = 0  # counts the masks and gains set so far (a compiled controller copies new ones)
        self._history: list[dict] = []
        self.captured_steps: list[int] = []
        self.rescaled_steps: list[int] = []

    # schedule (spec 3.5)
    def capturing(self, step: int) -> bool:
        """Whether step `step` records attention (begin <= step < thre)."""
        return self.begin <= step < self.thre

    def rescaling(self, step: int) -> bool:
        """Whether step `step` rescales: begin < step <= thre and some part has a mask and a
        gain with scale * lambda != 1 (a neutral gain runs the stock path, bit-identical)."""
        return self.begin < step <= self.thre and self._any_active

    def add(self, step: int, grid: tuple[int, int], groups: torch.Tensor, calls: int = 1) -> None:
        """Add one layer call's (b, N, G) group maps (float32) of the image queries on `grid`
        (or the sum of `calls` layer calls' maps, already on one grid)."""
        if self._sum_step is not None and step != self._sum_step:
            self.finalise()
        self._sum_step = step
        self.sums.add(grid, groups.detach().float())
        self._calls += calls

    def advance(self, step: int) -> None:
        """Called before every forward: finalise the previous step's sums once the step moved on."""
        if self._sum_step is not None and step != self._sum_step:
            self.finalise()

    def finalise(self) -> None:
        """Turn the pending sums into masks, gains and one history entry (spec 3.3)."""
        if self._sum_step is None:
            return
        maps = self.sums.combined(self.map_grid)  # (b, G, h, w)
        step, calls = self._sum_step, max(self._calls, 1)
        self.sums, self._sum_step, self._calls = GridSums(), None, 0
        k = self.n_parts
        reference, parts = maps[:, 0], maps[:, 1 : 1 + k]
        masks, thresholds = part_masks(parts, self.mask_threshold)
        flat_masks = masks.flatten(-2)
        gains, active = compute_gains(self.gain_mode, parts.flatten(-2), flat_masks, reference.flatten(-2),
                                      g_max=self.g_max, gain=self.gain, eps=self.eps)
        self._set(masks, gains, active, step)
        in_mask = (parts.flatten(-2) * flat_masks).sum(-1) / flat_masks.sum(-1).clamp_min(1)
        self._history.append({
            "step": step,
            "masks": masks.cpu(),
            "gains": gains.cpu(),
            "active": active.cpu(),
            "thresholds": thresholds.float().cpu(),
            # mean over image queries and captured layer calls: the share of attention on each part
            "mass": (parts.flatten(-2).mean(-1) / calls).cpu(),
            "mass_in_mask": (in_mask / calls).cpu(),
            "reference_mass": (reference.flatten(-2).mean(-1) / calls).cpu(),
            "layer_calls": calls,
            "rescaled": step in self.rescaled_steps,
        })

    def _set(self, masks, gains, active, step) -> None:
        self.masks, self.gains, self.active = masks, gains, active
        # a step rescales only if some part has a mask AND a gain that changes something: with
        # scale * lambda == 1 everywhere the bias would be 0, and the stock path runs (bit-identical)
        self._any_active = bool((active & (gains.float() * self.scale != 1)).any())
        self.masks_from = step
        self.version += 1

    def override(self, masks: torch.Tensor, gains: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Use these (b, K, h, w) masks and (b, K) gains from now on (tests, ablations)."""
        masks = masks.bool()
        self._set(masks, gains.float(), masks.flatten(-2).any(-1) if active is None else active.bool(), None)

    @property
    def history(self) -> list[dict]:
        """Per captured step: masks (b, K, h, w) bool, gains (b, K), active (b, K), thresholds,
        mass / mass_in_mask (b, K), reference_mass (b,), all CPU tensors; the masks and gains of
        entry i are the ones step i + 1 uses.  Reading it finalises a step still pending (the
        run ended inside the window)."""
        self.finalise()
        return self._history


def _groups_probs(probs: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
    """(b, heads, N, n_keys) probabilities -> (b, N, G) head-mean group sums."""
    return probs.mean(1) @ indicator.t()


# ----------------------------------------------------------------------------- SD family (ours)


def default_levels(layer_names: Iterable[str], unet_depth: int, up_depth: int | None = None) -> tuple[int, ...]:
    """The UNet levels SaaS uses on SD-family models (ours, spec 6-7), from the levels at which the
    encoder has cross-attention:

    | encoder cross-attention levels | model            | levels | grids (native size) |
    |--------------------------------|------------------|--------|---------------------|
    | 0, 1, 2                        | SD 1.x / 2.x     | 1, 2   | 32x32, 16x16        |
    | 1, 2                           | SDXL             | 2      | 32x32 (with mid)    |
    | 0, 1                           | builtin, tiny    | 0, 1   | 16x16, 8x8 (builtin)|

    Any other layout: its two coarsest encoder cross-attention levels.  Pass `levels` to
    `SaaSController` / `sd_layers` to choose others.
    """
    names = list(layer_names)
    down = sorted({_layers.parse(n).level(unet_depth, up_depth)
                   for n in _layers.cross_attention(names, section="down")})
    table = {(0, 1, 2): SD_DEFAULTS.sd15_levels, (1, 2): SD_DEFAULTS.sdxl_levels, (0, 1): SD_DEFAULTS.small_unet_levels}
    if tuple(down) in table:
        return table[tuple(down)]
    if not down:
        raise ValueError("this UNet has no cross-attention in its encoder")
    return tuple(down[-2:])


def sd_layers(layer_names: Iterable[str], unet_depth: int, levels: Sequence[int] | None = None,
              up_depth: int | None = None) -> list[str]:
    """The ``attn2`` layers SaaS captures and rescales on an SD-family UNet: every cross-attention
    layer (encoder, mid block, decoder) at the UNet `levels` (default `default_levels`)."""
    names = list(layer_names)
    levels = tuple(levels) if levels is not None else default_levels(names, unet_depth, up_depth)
    chosen = _layers.cross_attention(names, level=levels, unet_depth=unet_depth, up_depth=up_depth)
    if not chosen:
        raise ValueError(f"no cross-attention layer at UNet levels {levels}")
    return chosen


class _CompiledCaptureHandOver:
    """What both SaaS families share under torch.compile: compiled layers add their capture into
    a fixed buffer (`_compiled.sums`, on the grid `_compiled.grid`) and count their calls; between
    forwards, eagerly, the sums go to the `SaaSLoop` as the step's capture (if the step captured)
    and the buffer is zeroed."""

    _compiled = None  # the family's buffers (with .sums and .grid), None until a forward is prepared
    _compiled_calls = 0  # layer calls captured by compiled graphs since the last hand-over

    def _flush_compiled(self) -> None:
        """Hand the capture sums of compiled forwards to the loop (eagerly, between forwards)."""
        c, calls = self._compiled, self._compiled_calls
        if c is None or not calls:
            return
        self._compiled_calls = 0
        if self._capturing:
            self.loop.add(self._step, c.grid, c.sums.clone(), calls)
        c.sums.zero_()


@dataclass
class _CompiledBuffers:
    """Every tensor a compiled `SaaSController` layer reads: allocated once per call shape and
    refreshed in place before each forward, so the compiled graph reads the same objects (and
    branches on nothing) at every step."""

    key: tuple
    grid: tuple[int, int]  # the mask grid (the finest captured layer's)
    rows: torch.Tensor  # the measured rows' batch indices
    masks: torch.Tensor  # (b, K, h, w) float: the masks the current step rescales with
    gains: torch.Tensor  # (b, K)
    active: torch.Tensor  # (b, K) bool
    sums: torch.Tensor  # (b, h * w, 1 + K): this forward's captured group maps, on `grid`
    capturing: torch.Tensor  # 0-d bool: this step captures
    rescaling: torch.Tensor  # 0-d bool: this step rescales
    version: int = -1  # the `SaaSLoop.version` of the masks copied in


class SaaSController(_CompiledCaptureHandOver, AttentionController):
    """SaaS on SD-family UNet cross-attention (``attn2``): our extrapolation (spec 6-7).

    spans: token positions of the parts in the 77 CLIP keys (`clip_spans`), disjoint, after BOS.
    layers: the layer names to capture and rescale (`sd_layers`).
    window: (begin, thre): capture at begin <= i < thre, rescale at begin < i <= thre
        (`sd_window(T)` for the 0.4 * T default).
    scale: SCALE; the bias is log(scale * lambda_k).
    gain_mode: "equalize" (default), "fixed" (with `gain`), "sink_ratio" (SOT as the competitor,
        key `sink_index`), or "paper" (the same ratio, unclipped).
    g_max: the clip of "equalize" and "sink_ratio".
    mask_threshold: "auto" (Otsu) or a float in [0, 1).
    rows: the batch roles that are measured and modified (default the "cond" rows); every other
        row is bit-identical to stock.  Several rows per role are measured one by one (each has
        its own masks and gains).
    map_grid: the grid masks are made on (default: the finest captured layer grid).
    map_level: the UNet level of the finest captured layer, which gives that grid from the latent
        size before the first forward (`pipelines.instruct` passes it).  torch.compile needs it
        (or `map_grid`): every buffer a compiled layer reads must exist from the first step.
    state: the per-call `ControlState`; its `row_roles` come from the pipeline: IP2P's batch is
        ("cond", "image", "uncond"), text-to-image CFG ("uncond", "cond").

    Diagnostics: `history` (see `SaaSLoop.history`), `loop.captured_steps`, `loop.rescaled_steps`.

    torch.compile: eagerly, a layer branches on the step (capture, rescale, or the stock path
    alone).  Inside a compiled graph it cannot without recompiling at every phase change, so there
    the layer runs one graph at every step: the biased attention of the measured rows is always
    computed and 0-d flag tensors pick it or the stock rows, and the capture is always computed
    and added times its flag into one buffer on the mask grid (each call's maps resized there:
    bilinear resizing is linear, so the sum is the eager one up to rounding).  `begin_forward`
    (eager, outside the graph) refreshes the flags, masks and gains in place and hands the
    captured sums to the loop.  The cost: one SDPA over the measured rows on steps outside the
    window, which eager skips.
    """

    def __init__(self, spans: Sequence[slice], layers: Iterable[str], *,
                 window: tuple[int, int] = (PAPER_DEFAULTS.begin, PAPER_DEFAULTS.thre),
                 scale: float = PAPER_DEFAULTS.scale, gain_mode: str = SD_DEFAULTS.gain_mode,
                 g_max: float = SD_DEFAULTS.g_max, gain: float | None = None,
                 mask_threshold: str | float = PAPER_DEFAULTS.mask_threshold, rows: tuple[str, ...] = ("cond",),
                 sink_index: int = 0, map_grid: tuple[int, int] | None = None, map_level: int | None = None,
                 state: ControlState | None = None):
        super().__init__(state or ControlState(row_roles=("uncond", "cond")))
        self.spans = [slice(int(s.start), int(s.stop)) for s in spans]
        if not self.spans:
            raise ValueError("SaaS needs at least one sub-instruction span")
        ordered = sorted(self.spans, key=lambda s: s.start)
        for s in ordered:
            if s.start <= sink_index or s.stop <= s.start:
                raise ValueError(f"span {s} is empty or overlaps the start-of-text token")
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.stop:
                raise ValueError(f"spans {a} and {b} overlap")
        self.rows = tuple(rows)
        missing = [r for r in self.rows if r not in self.state.row_roles]
        if missing:
            raise ValueError(f"row role {missing[0]!r} is not in this call's roles {self.state.row_roles}")
        self.layers = list(layers)
        self._selected = set(self.layers)
        self.sink_index = int(sink_index)
        self.loop = SaaSLoop(len(self.spans), window=window, scale=scale, gain_mode=gain_mode, g_max=g_max, gain=gain,
                             mask_threshold=mask_threshold, map_grid=map_grid)
        self._capturing = self._rescaling = False
        self._step = -1
        self._indicators: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._biases: dict[tuple, torch.Tensor] = {}
        self._index: tuple[int, torch.device, torch.Tensor] | None = None
        self.map_level = None if map_level is None else int(map_level)
        self._compiled: _CompiledBuffers | None = None
        self._compiled_calls = 0  # layer calls captured by compiled graphs since the last hand-over

    def select(self, name: str) -> bool:
        return name in self._selected

    @property
    def history(self) -> list[dict]:
        """Per captured step, masks / gains / masses (see `SaaSLoop.history`)."""
        self._flush_compiled()
        return self.loop.history

    def begin_forward(self) -> None:
        self._flush_compiled()
        step = self.state.step
        self.loop.advance(step)
        if step != self._step:
            self._step = step
            self._biases = {}
            self._capturing = self.loop.capturing(step)
            self._rescaling = self.loop.rescaling(step)
            if self._capturing:
                self.loop.captured_steps.append(step)
            if self._rescaling:
                self.loop.rescaled_steps.append(step)
        self._prepare_compiled()

    # torch.compile (see the class docstring): buffers refreshed eagerly, one graph for every step
    def _map_grid(self) -> tuple[int, int] | None:
        if self.loop.map_grid is not None:
            return tuple(self.loop.map_grid)
        hw = self.state.latent_hw
        if self.map_level is None or hw is None:
            return None
        factor = 2 ** self.map_level
        return math.ceil(hw[0] / factor), math.ceil(hw[1] / factor)

    def _prepare_compiled(self) -> None:
        state = self.state
        grid = self._map_grid()
        if grid is None or state.batch_size is None or state.device is None:
            self._compiled = None
            return
        key = (grid, state.batch_size, torch.device(state.device), state.row_roles)
        c = self._compiled
        if c is None or c.key != key:
            device = torch.device(state.device)
            rows = self._row_index(state.batch_size, device)
            b, k = rows.numel(), len(self.spans)
            c = self._compiled = _CompiledBuffers(
                key, grid, rows, torch.zeros(b, k, *grid, device=device), torch.ones(b, k, device=device),
                torch.zeros(b, k, dtype=torch.bool, device=device), torch.zeros(b, grid[0] * grid[1], 1 + k, device=device),
                torch.zeros((), dtype=torch.bool, device=device), torch.zeros((), dtype=torch.bool, device=device))
        loop = self.loop
        if loop.masks is not None and c.version != loop.version:
            if loop.masks.shape[0] != c.masks.shape[0]:
                raise ValueError("the number of measured rows changed between steps")
            c.masks.copy_(resize_to_grid(loop.masks.float(), grid, hard=True))
            c.gains.copy_(loop.gains)
            c.active.copy_(loop.active)
            c.version = loop.version
        c.capturing.fill_(self._capturing)
        c.rescaling.fill_(self._rescaling)

    def _buffers(self) -> _CompiledBuffers:
        if self._compiled is None:
            raise RuntimeError("SaaS under torch.compile needs its mask grid before the first step: build the "
                               "controller with map_level (the finest captured layer's UNet level) or map_grid, "
                               "and attach it")
        return self._compiled

    def _compiled_bias(self, call: AttentionCall, c: _CompiledBuffers) -> torch.Tensor:
        masks_tok = mask_to_tokens(c.masks, call.grid, hard=True)
        return log_gain_bias(masks_tok > 0.5, c.gains, c.active, self.spans, call.key.shape[2], self.loop.scale)

    def _attend_compiled(self, call: AttentionCall) -> torch.Tensor:
        c = self._buffers()
        q, k, v = call.query, call.key, call.value
        stock = call.sdpa(q, k, v, attn_mask=call.attn_mask, scale=call.logit_scale)
        idx = c.rows
        mask = combine_masks(self._model_mask_rows(call, idx), self._compiled_bias(call, c), q.dtype)
        boosted = call.sdpa(q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx),
                            attn_mask=mask, scale=call.logit_scale)
        kept = torch.where(c.rescaling, boosted.to(stock.dtype), stock.index_select(0, idx))
        return stock.index_copy(0, idx, kept)

    def _capture_compiled(self, call: AttentionCall) -> None:
        c = self._buffers()
        with torch.no_grad():
            logits = self._row_logits(call, c.rows)
            logits = torch.where(c.rescaling, logits + self._compiled_bias(call, c), logits)
            groups = _groups_probs(logits.softmax(-1), self._span_indicator(call.key.shape[2], logits.device))
            maps = grid_maps(groups, call.grid, c.grid)  # (b, 1 + K, h, w)
            c.sums.add_(maps.flatten(-2).transpose(1, 2) * c.capturing)
        self._compiled_calls += 1

    # rows
    def _row_index(self, batch: int, device) -> torch.Tensor:
        if self._index is None or self._index[0] != batch or self._index[1] != device:
            rows = [r for role in self.rows for r in range(*self.state.rows(role, batch).indices(batch))]
            self._index = (batch, device, torch.tensor(sorted(rows), dtype=torch.long, device=device))
        return self._index[2]

    def _indicator(self, n_keys: int, device) -> torch.Tensor:
        key = (n_keys, torch.device(device))
        ind = self._indicators.get(key)
        if ind is None:
            ind = self._indicators[key] = self._span_indicator(n_keys, device)
        return ind

    def _span_indicator(self, n_keys: int, device) -> torch.Tensor:
        """(1 + K, n_keys): the start-of-text token (the reference group), then each part's span."""
        if max(s.stop for s in self.spans) > n_keys:
            raise ValueError(f"a span reaches past the {n_keys} text keys of this layer")
        return span_indicator([slice(self.sink_index, self.sink_index + 1), *self.spans], n_keys, device)

    def _bias(self, call: AttentionCall) -> torch.Tensor:
        """This step's (b, 1, N, n_keys) float32 bias for the measured rows of this layer's grid."""
        n_keys = call.key.shape[2]
        key = (call.grid, n_keys, call.query.device)
        bias = self._biases.get(key)
        if bias is None:
            loop = self.loop
            masks_tok = mask_to_tokens(loop.masks.float(), call.grid, hard=True).to(call.query.device)
            if masks_tok.shape[0] != self._row_index(call.batch_size, call.query.device).numel():
                raise ValueError("the number of measured rows changed between steps")
            bias = log_gain_bias(masks_tok > 0.5, loop.gains.to(masks_tok.device), loop.active.to(masks_tok.device),
                                 self.spans, n_keys, loop.scale)
            self._biases[key] = bias
        return bias

    def bias_for(self, call: AttentionCall) -> torch.Tensor | None:
        """The full-batch (B, 1, N, n_keys) bias this step applies (zeros on unmeasured rows), or
        None when nothing is rescaled: for inspection; the layer itself runs `attend`."""
        if not self._rescaling or call.text_keys is None:
            return None
        idx = self._row_index(call.batch_size, call.query.device)
        rows = self._bias(call)
        full = torch.zeros(call.batch_size, *rows.shape[1:], device=rows.device)
        return full.index_copy(0, idx, rows)

    def _row_logits(self, call: AttentionCall, idx: torch.Tensor) -> torch.Tensor:
        """float32 logits (b, heads, N, n_keys) of the measured rows `idx`, the model's mask added."""
        q = call.query.index_select(0, idx).float()
        k = call.key.index_select(0, idx).float() * call.scale
        logits = q @ k.transpose(-1, -2)
        model_mask = self._model_mask_rows(call, idx)
        return logits if model_mask is None else logits + model_mask.float()

    def _model_mask_rows(self, call: AttentionCall, idx: torch.Tensor) -> torch.Tensor | None:
        m = call.attn_mask
        if m is not None and m.shape[0] == call.batch_size and call.batch_size != 1:
            m = m.index_select(0, idx)
        return m

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        """Rescale steps: the stock attention of the whole batch, with the measured rows recomputed
        under the log-gain bias (so every other row stays bit-identical).  Otherwise None (stock)."""
        if call.text_keys is not None and torch.compiler.is_compiling():
            return self._attend_compiled(call)
        if not self._rescaling or call.text_keys is None:
            return None
        q, k, v = call.query, call.key, call.value
        stock = call.sdpa(q, k, v, attn_mask=call.attn_mask, scale=call.logit_scale)
        idx = self._row_index(call.batch_size, q.device)
        mask = combine_masks(self._model_mask_rows(call, idx), self._bias(call), q.dtype)
        boosted = call.sdpa(q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx),
                            attn_mask=mask, scale=call.logit_scale)
        return stock.index_copy(0, idx, boosted.to(stock.dtype))

    def capture(self, call: AttentionCall) -> None:
        """Capture steps: head-mean probabilities (after this step's rescale) of the measured rows'
        image queries, summed over SOT and each span: (b, N, 1 + K) into the step's grid sums."""
        if call.text_keys is not None and torch.compiler.is_compiling():
            return self._capture_compiled(call)
        if not self._capturing or call.text_keys is None:
            return
        with torch.no_grad():
            logits = self._row_logits(call, self._row_index(call.batch_size, call.query.device))
            if self._rescaling:
                logits = logits + self._bias(call)
            groups = _groups_probs(logits.softmax(-1), self._indicator(call.key.shape[2], logits.device))
            self.loop.add(self._step, call.grid, groups)


# ----------------------------------------------------------------------------- OmniGen (the paper's)


@dataclass
class _JointCompiledBuffers:
    """Every value a compiled joint-sequence SaaS layer reads (`_JointSequenceSaaSState`): Python
    values fixed for the call (the cond row, the output-image query range) and tensors allocated
    once per layout and refreshed in place before each forward, so a compiled graph reads the same
    objects and branches on nothing at every step."""

    key: tuple
    grid: tuple[int, int]  # the output image's token grid (the capture's)
    row: int  # the cond row
    start: int  # the output-image queries: positions start..stop - 1 of the sequence
    stop: int
    bias: torch.Tensor  # (1, 1, N_out, L) float32: the log-gain bias of the current masks and gains
    indicator: torch.Tensor  # (L, G padded to 8) one-hot group indicators [reference, S_1..S_K]
    sums: torch.Tensor  # (1, N_out, 1 + K): this forward's captured group maps
    capturing: torch.Tensor  # 0-d bool: this step captures
    rescaling: torch.Tensor  # 0-d bool: this step rescales
    version: int = -1  # the `SaaSLoop.version` of the masks the bias was built from


class _JointSequenceSaaSState(_CompiledCaptureHandOver):
    """What SaaS needs on a model whose text, reference image and output image are tokens of one
    attention sequence (OmniGen, FLUX Kontext): the per-call state shared by every SaaS processor
    of one transformer, bound into them at construction (a shared state plus a layer index).

    spans: token positions of the parts in the measured row's sequence (the row the model
        receives); the reference (competitor) keys and the output-image queries are given at
        every forward by the family's subclass (`_begin`).
    capture_layers / scale_layers: layer indices (the family's own numbering).
    window, scale, gain_mode, g_max (None: unclipped), gain, mask_threshold: as `SaaSLoop`.
    row_roles: the roles of the batch rows; only the "cond" row is measured and modified, and it
        must be alone in its role.
    seq_len: the sequence length L the caller expects (checked at every forward), or None.

    torch.compile: eagerly, a layer branches on the step in Python (capture, rescale, neither).
    Inside a compiled graph (`torch.compiler.is_compiling()`) it takes one path at every step
    instead (`_apply_compiled`): the biased attention of the cond row's output queries is always
    computed and a 0-d flag tensor picks it or the stock output, and the capture is always
    computed and added times its flag into one buffer on the output grid.  `_begin`, which runs
    eagerly before every forward (the install functions' pre-hooks are `torch.compiler.disable`d
    and hooks of a compiled module run outside its graph), refreshes the flags and the bias in
    place and hands the captured sums to the loop (`_flush_compiled`).  Everything the graph
    reads is known at the first forward (rows, output grid, reference and text positions, from
    the forward's inputs), so it compiles once for every step.  The cost: on steps outside the
    window, one attention of the cond row's output queries and one capture attention per SaaS
    layer that eager skips.
    """

    #: the model's name in error messages
    family = "this model"

    def __init__(self, spans: Sequence[slice], *, capture_layers: Iterable[int] = PAPER_DEFAULTS.capture_layers,
                 scale_layers: Iterable[int] = PAPER_DEFAULTS.scale_layers,
                 window: tuple[int, int] = (PAPER_DEFAULTS.begin, PAPER_DEFAULTS.thre),
                 scale: float = PAPER_DEFAULTS.scale, gain_mode: str = PAPER_DEFAULTS.gain_mode,
                 g_max: float | None = None, gain: float | None = None,
                 mask_threshold: str | float = PAPER_DEFAULTS.mask_threshold,
                 row_roles: tuple[str, ...] = ("cond",), seq_len: int | None = None):
        self.spans = [slice(int(s.start), int(s.stop)) for s in spans]
        if not self.spans or any(s.stop <= s.start for s in self.spans):
            raise ValueError("SaaS needs non-empty sub-instruction spans")
        self.capture_layers = frozenset(int(i) for i in capture_layers)
        self.scale_layers = frozenset(int(i) for i in scale_layers)
        self.control = ControlState(row_roles=row_roles)
        self.seq_len = seq_len
        self.loop = SaaSLoop(len(self.spans), window=window, scale=scale, gain_mode=gain_mode, g_max=g_max, gain=gain,
                             mask_threshold=mask_threshold)
        self.row: int | None = None
        self.out_grid: tuple[int, int] | None = None
        self.out_queries: slice | None = None  # positions of the output-image tokens in the sequence
        self.reference: list[slice] = []  # the competitor's key positions (the paper's input-image tokens)
        self._capturing = self._rescaling = False
        self._step = -1
        self._bias: torch.Tensor | None = None
        self._indicator: torch.Tensor | None = None
        self._compiled: _JointCompiledBuffers | None = None
        self._compiled_calls = 0  # layer calls captured by compiled graphs since the last hand-over

    @property
    def layers(self) -> frozenset[int]:
        """Every layer index that gets a SaaS processor (capture or scale)."""
        return self.capture_layers | self.scale_layers

    @property
    def n_out(self) -> int:
        return self.out_grid[0] * self.out_grid[1]

    @property
    def history(self) -> list[dict]:
        """Per captured step, masks / gains / masses (see `SaaSLoop.history`)."""
        self._flush_compiled()
        return self.loop.history

    def _begin(self, *, batch_size: int, out_grid: tuple[int, int], out_queries: slice, reference: list[slice],
               seq_len: int, timestep=None, step: int | None = None, device=None) -> None:
        """Prepare one transformer forward: rows, grids and spans are checked, the step advanced
        (from `timestep`, or set to `step`), the previous step finalised, this step's bias built,
        the buffers of compiled layers refreshed (on `device`, the transformer input's; default
        CPU)."""
        self._flush_compiled()
        rows = self.control.rows("cond", batch_size)
        if rows.stop - rows.start != 1:
            raise ValueError(f"SaaS on {self.family} measures one cond row; this batch has {rows.stop - rows.start}")
        self.row = rows.start
        if self.seq_len is not None and seq_len != self.seq_len:
            raise ValueError(f"the transformer received {seq_len} tokens, the spans were computed for {self.seq_len}")
        if max(s.stop for s in self.spans) > seq_len:
            raise ValueError(f"a span reaches past the {seq_len} tokens of the sequence")
        if tuple(out_grid) != self.out_grid and self.out_grid is not None and self.loop.masks is not None:
            raise ValueError("the output grid changed during the call")
        self.out_grid = tuple(out_grid)
        if out_queries.stop - out_queries.start != self.n_out:
            raise ValueError(f"{out_queries.stop - out_queries.start} output-image tokens for a {self.out_grid} grid")
        self.out_queries = out_queries
        self.reference = list(reference)
        if step is not None:
            self.control.step = step
        elif timestep is not None:
            self.control.begin_step(timestep)
        current = self.control.step
        self.loop.advance(current)
        if current != self._step or self._indicator is None or self._indicator.shape[-2] != seq_len:
            self._step = current
            self._capturing = self.loop.capturing(current)
            self._rescaling = self.loop.rescaling(current)
            if self._capturing and current not in self.loop.captured_steps:
                self.loop.captured_steps.append(current)
            if self._rescaling and current not in self.loop.rescaled_steps:
                self.loop.rescaled_steps.append(current)
            # value matrix of one-hot group indicators: [reference, S_1..S_K], width padded to 8
            self._indicator = span_indicator([self.reference, *self.spans], seq_len, pad_to=8).t().contiguous()
            self._bias = None
            if self._rescaling:
                loop = self.loop
                if tuple(loop.masks.shape[-2:]) != self.out_grid:
                    raise ValueError(f"masks of grid {tuple(loop.masks.shape[-2:])} for output grid {self.out_grid}")
                self._bias = log_gain_bias(loop.masks.flatten(-2), loop.gains, loop.active, self.spans, seq_len,
                                           loop.scale)
        self._prepare_compiled(seq_len, device)

    # torch.compile (see the class docstring): buffers refreshed eagerly, one graph for every step
    def _prepare_compiled(self, seq_len: int, device) -> None:
        device = torch.device("cpu" if device is None else device)
        out_q = self.out_queries
        key = (self.row, self.out_grid, out_q.start, out_q.stop, tuple((s.start, s.stop) for s in self.reference),
               seq_len, device)
        c = self._compiled
        if c is None or c.key != key:
            k = len(self.spans)
            c = self._compiled = _JointCompiledBuffers(
                key, tuple(self.out_grid), self.row, out_q.start, out_q.stop, torch.zeros(1, 1, self.n_out, seq_len, device=device),
                span_indicator([self.reference, *self.spans], seq_len, device, pad_to=8).t().contiguous(),
                torch.zeros(1, self.n_out, 1 + k, device=device), torch.zeros((), dtype=torch.bool, device=device),
                torch.zeros((), dtype=torch.bool, device=device))
        if self._bias is not None and c.version != self.loop.version:  # a rescale step's bias (eager's own)
            c.bias.copy_(self._bias)
            c.version = self.loop.version
        c.capturing.fill_(self._capturing)
        c.rescaling.fill_(self._rescaling)

    def _apply_compiled(self, layer: int, query, key, value, attention_mask, out: torch.Tensor,
                        attend) -> torch.Tensor:
        """`apply` inside a compiled graph: the same computation for every step, the step's phase
        picked by the flag tensors (see the class docstring).  The rescaled output equals eager's
        (the same biased attention, spliced the same way); the capture on a step that does not
        rescale runs with a zero bias (eager: no bias), equal up to rounding."""
        rescale, capture = layer in self.scale_layers, layer in self.capture_layers
        if not (rescale or capture):
            return out
        c = self._compiled
        if c is None:
            raise RuntimeError(f"SaaS on {self.family} under torch.compile: no forward was prepared "
                               f"(install the state with its install function, whose pre-hook prepares each one)")
        r, a, b = c.row, c.start, c.stop
        q0, k0, v0 = query[r : r + 1, :, a:b], key[r : r + 1], value[r : r + 1]
        m0 = None
        if attention_mask is not None:
            m = attention_mask[r : r + 1] if attention_mask.shape[0] != 1 else attention_mask
            m0 = m[..., a:b, :] if m.shape[-2] != 1 else m
        if rescale:
            boosted = attend(q0, k0, v0, attn_mask=combine_masks(m0, c.bias, query.dtype))
            row = torch.cat([out[r : r + 1, :, :a], boosted.to(out.dtype), out[r : r + 1, :, b:]], dim=2)
            out = torch.where(c.rescaling, torch.cat([out[:r], row, out[r + 1 :]], dim=0), out)
            m0 = combine_masks(m0, c.bias * c.rescaling, query.dtype)  # the capture sees this step's bias
        if capture:
            with torch.no_grad():
                v_ind = c.indicator.expand(1, q0.shape[1], *c.indicator.shape)
                mask = None if m0 is None else m0.float()
                groups = F.scaled_dot_product_attention(q0.float(), k0.float(), v_ind, attn_mask=mask)
                groups = groups.mean(1)[..., : 1 + len(self.spans)]  # (1, N_out, G)
                c.sums.add_(groups * c.capturing)
            self._compiled_calls += 1
        return out

    def captures(self, layer: int) -> bool:
        return self._capturing and layer in self.capture_layers

    def rescales(self, layer: int) -> bool:
        return self._rescaling and layer in self.scale_layers

    def apply(self, layer: int, query, key, value, attention_mask, out: torch.Tensor,
              attend=F.scaled_dot_product_attention) -> torch.Tensor:
        """Given the stock attention output `out` (B, heads, L, D) of one layer, return it with the
        cond row's output-image queries recomputed under the log-gain bias (scale steps), and add
        the group masses of those queries to the step's sums (capture steps); spec 4.  `attend`:
        the fused attention the boosted queries run through (SDPA layout, ``attn_mask=``).
        Inside a compiled graph: `_apply_compiled`."""
        if torch.compiler.is_compiling():
            return self._apply_compiled(layer, query, key, value, attention_mask, out, attend)
        rescale, capture = self.rescales(layer), self.captures(layer)
        if not (rescale or capture):
            return out
        r, out_q = self.row, self.out_queries
        q0, k0, v0 = query[r : r + 1, :, out_q], key[r : r + 1], value[r : r + 1]
        m0 = None
        if attention_mask is not None:
            m = attention_mask[r : r + 1] if attention_mask.shape[0] != 1 else attention_mask
            m0 = m[..., out_q, :] if m.shape[-2] != 1 else m
        if rescale:
            m0 = combine_masks(m0, self._bias.to(query.device), query.dtype)
            boosted = attend(q0, k0, v0, attn_mask=m0)
            row = torch.cat([out[r : r + 1, :, : out_q.start], boosted.to(out.dtype), out[r : r + 1, :, out_q.stop :]],
                            dim=2)
            out = torch.cat([out[:r], row, out[r + 1 :]], dim=0)
        if capture:
            with torch.no_grad():
                ind = self._indicator.to(query.device)
                v_ind = ind.expand(1, q0.shape[1], *ind.shape)
                mask = None if m0 is None else m0.float()
                groups = F.scaled_dot_product_attention(q0.float(), k0.float(), v_ind, attn_mask=mask)
                groups = groups.mean(1)[..., : 1 + len(self.spans)]  # (1, N_out, G)
                self.loop.add(self._step, self.out_grid, groups)
        return out


class SaaSOmniGenState(_JointSequenceSaaSState):
    """The per-call SaaS state shared by every `SaaSOmniGenProcessor` of one OmniGen transformer.

    spans: token positions of the parts in the cond row's padded sequence (the row the model
        receives); the input-image span(s) come from ``input_image_sizes`` at every forward.
    capture_layers / scale_layers: layer indices (paper: 8-31 both).
    window, scale, gain_mode ("paper" default), g_max (None: unclipped), mask_threshold: as
        `SaaSLoop`.
    row_roles: the roles of the batch rows (the pipeline's CFG batch is cond, uncond, img_cond);
        only the "cond" row is measured and modified, and it must be alone in its role.
    seq_len: the sequence length L the caller expects (checked at every forward), or None.

    `begin_forward` is called by `install_omnigen`'s pre-hook (or by hand in tests) before each
    transformer forward: it advances the step from the timestep (`ControlState.begin_step`),
    finalises the previous step and prepares this step's bias.
    """

    family = "OmniGen"

    def __init__(self, spans: Sequence[slice], *, row_roles: tuple[str, ...] = ("cond", "uncond", "image"),
                 **options):
        super().__init__(spans, row_roles=row_roles, **options)

    @property
    def input_image(self) -> list[slice]:
        """The input image's token positions in the cond row (the paper's competitor)."""
        return self.reference

    def begin_forward(self, *, batch_size: int, out_grid: tuple[int, int], input_image_sizes: dict | None,
                      seq_len: int, timestep=None, step: int | None = None, device=None) -> None:
        """Prepare one transformer forward (`_JointSequenceSaaSState._begin`): the output image is
        the last tokens of the sequence, the input image(s) where ``input_image_sizes`` says;
        `device`: where the transformer runs (the compiled layers' buffers live there)."""
        row = self.control.rows("cond", batch_size).start
        sizes = (input_image_sizes or {}).get(row, [])
        n_out = out_grid[0] * out_grid[1]
        self._begin(batch_size=batch_size, out_grid=out_grid, out_queries=slice(seq_len - n_out, seq_len),
                    reference=[slice(int(a), int(b)) for a, b in sizes], seq_len=seq_len, timestep=timestep,
                    step=step, device=device)


class SaaSOmniGenProcessor:
    """`OmniGenAttnProcessor2_0` plus SaaS (spec 4): the stock computation for every row, then
    `SaaSOmniGenState.apply` on the cond row's output-image queries when this layer is active.

    State is bound at construction (a shared `SaaSOmniGenState` and this layer's index) because
    `OmniGenBlock` passes fixed keyword arguments and the transformer takes no attention kwargs;
    `image_rotary_emb` stays a named parameter since diffusers filters kwargs by signature.
    """

    def __init__(self, state: SaaSOmniGenState, layer_idx: int):
        self.state = state
        self.layer_idx = int(layer_idx)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        # exactly OmniGenAttnProcessor2_0 (diffusers 0.42), same operations in the same order
        batch_size, sequence_length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        bsz, q_len, query_dim = query.size()
        inner_dim = key.shape[-1]
        head_dim = query_dim // attn.heads
        kv_heads = inner_dim // head_dim
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, kv_heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, kv_heads, head_dim).transpose(1, 2)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real_unbind_dim=-2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = self.state.apply(self.layer_idx, query, key, value, attention_mask, hidden_states)
        hidden_states = hidden_states.transpose(1, 2).type_as(query)
        hidden_states = hidden_states.reshape(bsz, q_len, attn.out_dim)
        return attn.to_out[0](hidden_states)


@contextmanager
def install_omnigen(transformer, state: SaaSOmniGenState) -> Iterator[SaaSOmniGenState]:
    """Install `SaaSOmniGenProcessor` on ``layers.{l}.self_attn`` for l in ``state.layers`` (every
    other layer keeps its processor object) for one call, with a forward pre-hook that feeds
    `state.begin_forward` from the transformer's inputs; the original processor objects are
    restored on exit, also when the call raises.

    diffusers' `OmniGenTransformer2DModel` has no ``set_attn_processor`` (it is not an
    AttentionMixin), so processors are set per attention module, found as
    ``transformer.layers[i].self_attn`` (no name parsing).

    torch.compile: the pre-hook is `torch.compiler.disable`d and runs outside the compiled
    region whether the transformer is compiled whole (hooks of a compiled module run outside its
    graph) or by blocks (the transformer's own forward stays eager); it gives `begin_forward`
    the layout and the device, so the compiled layers find their buffers from the first step.
    Works on a compiled transformer (installs on ``_orig_mod``).
    """
    transformer = getattr(transformer, "_orig_mod", transformer)
    modules = [block.self_attn for block in transformer.layers]
    unknown = sorted(i for i in state.layers if not 0 <= i < len(modules))
    if unknown:
        raise ValueError(f"this OmniGen transformer has {len(modules)} layers; it has no layer {unknown[0]}")
    patch = transformer.config.patch_size
    originals = [(module, module.get_processor()) for module in modules]

    @torch.compiler.disable
    def hook(module, args, kwargs):
        def arg(name, position):
            return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)

        hidden, timestep, ids = arg("hidden_states", 0), arg("timestep", 1), arg("input_ids", 2)
        sizes, mask = arg("input_image_sizes", 4), arg("attention_mask", 5)
        grid = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
        if mask is not None:
            seq_len = mask.shape[-1]
        else:
            seq_len = (0 if ids is None else ids.shape[1]) + 1 + grid[0] * grid[1]
        state.begin_forward(batch_size=hidden.shape[0], out_grid=grid, input_image_sizes=sizes, seq_len=seq_len,
                            timestep=timestep, device=hidden.device)
        return None

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, module in enumerate(modules):
            if i in state.layers:
                module.set_processor(SaaSOmniGenProcessor(state, i))
        yield state
    finally:
        handle.remove()
        for module, processor in originals:
            module.set_processor(processor)



# ----------------------------------------------------------------------------- FLUX Kontext (ours)


class SaaSFluxKontextState(_JointSequenceSaaSState):
    """The per-call SaaS state of one FLUX Kontext transformer: OUR EXTRAPOLATION of the paper
    (docs/methods/instruction.md, "FLUX Kontext"), not the paper's.

    FLUX Kontext's joint sequence is [T5 text, noisy (output) latents, reference-image latents]
    in every dual-stream block (text and image streams concatenated inside the attention) and
    every single-stream block (concatenated before it).  The reference latents play the input
    image's role of the paper: they are the competitor of the paper's gain rule.  Layers are
    numbered in execution order: dual-stream block i is layer i, single-stream block j is layer
    ``n_dual + j``.  The pipeline has no CFG batch by default (guidance is an embedding): its one
    row is the cond row.

    `begin_forward` is called by `install_flux_kontext`'s pre-hook before each transformer
    forward with the layout read from the transformer's inputs.
    """

    family = "FLUX Kontext"

    def begin_forward(self, *, batch_size: int, n_txt: int, out_grid: tuple[int, int], n_reference: int,
                      timestep=None, step: int | None = None, device=None) -> None:
        """Prepare one forward: the text is the first `n_txt` tokens, then the output image's
        out_grid tokens, then the `n_reference` reference-image tokens; `device`: where the
        transformer runs (the compiled layers' buffers live there)."""
        n_out = out_grid[0] * out_grid[1]
        if n_reference <= 0:
            raise ValueError("SaaS on FLUX Kontext needs the reference image's tokens (the pipeline got no image)")
        out_queries = slice(n_txt, n_txt + n_out)
        seq_len = n_txt + n_out + n_reference
        if max(s.stop for s in self.spans) > n_txt:
            raise ValueError(f"a span reaches past the {n_txt} text tokens")
        self._begin(batch_size=batch_size, out_grid=out_grid, out_queries=out_queries,
                    reference=[slice(out_queries.stop, seq_len)], seq_len=seq_len, timestep=timestep, step=step,
                    device=device)


def flux_kontext_image_layout(img_ids: torch.Tensor) -> tuple[tuple[int, int], int]:
    """(output grid (h, w), number of reference tokens) from FLUX Kontext's image position ids
    (N, 3): the pipeline gives the noisy latents ids (0, row, col) and the reference latents
    (1, row, col), in that order (diffusers `FluxKontextPipeline.prepare_latents`)."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    kind = ids[:, 0].round().long().cpu()
    n_out = int((kind == 0).sum())
    if n_out == 0 or not bool((kind[:n_out] == 0).all()) or not bool((kind[n_out:] == 1).all()):
        raise ValueError("FLUX Kontext's image ids are not [output tokens (0, ...), reference tokens (1, ...)]")
    out = ids[:n_out].cpu()
    grid = (int(out[:, 1].max()) + 1, int(out[:, 2].max()) + 1)
    if grid[0] * grid[1] != n_out:
        raise ValueError(f"{n_out} output tokens do not fill a {grid[0]}x{grid[1]} grid")
    return grid, int(kind.numel()) - n_out


class SaaSFluxKontextProcessor:
    """diffusers' `FluxAttnProcessor` plus SaaS on FLUX Kontext (ours): the stock computation for
    every row and query (the same projections, norms, rotary embedding and dispatched attention
    with the stock processor's backend), then `SaaSFluxKontextState.apply` on the cond row's
    output-image queries when this layer is active.  One class for dual-stream blocks (text and
    image arrive apart) and single-stream blocks (already concatenated): the sequence order is
    [text, output image, reference image] in both."""

    def __init__(self, state: SaaSFluxKontextState, layer_idx: int, stock=None):
        self.state = state
        self.layer_idx = int(layer_idx)
        # what `set_attention_backend` / context parallelism set on the stock processor
        self._attention_backend = getattr(stock, "_attention_backend", None)
        self._parallel_config = getattr(stock, "_parallel_config", None)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        # exactly FluxAttnProcessor (diffusers 0.42), same operations in the same order
        (query, key, value), (encoder_query, encoder_key, encoder_value) = flux_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        # SaaS works in SDPA layout (B, heads, N, D); transposes are views, so inactive layers stay bit-identical
        backend = self._attention_backend

        def attend(q, k, v, attn_mask=None):
            return fused_attention(q, k, v, attn_mask=attn_mask, backend=backend)

        hidden_states = self.state.apply(self.layer_idx, query.transpose(1, 2), key.transpose(1, 2),
                                         value.transpose(1, 2), attention_mask, hidden_states.transpose(1, 2),
                                         attend=attend).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def flux_attention_modules(transformer) -> list:
    """The attention modules of a FLUX transformer in execution order (SaaS's layer numbering):
    every dual-stream block's, then every single-stream block's."""
    transformer = getattr(transformer, "_orig_mod", transformer)
    return [block.attn for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]


@contextmanager
def install_flux_kontext(transformer, state: SaaSFluxKontextState) -> Iterator[SaaSFluxKontextState]:
    """Install `SaaSFluxKontextProcessor` on the attention of the blocks in ``state.layers``
    (`flux_attention_modules` numbering; every other layer keeps its processor object) for one
    call, with a forward pre-hook that feeds `state.begin_forward` from the transformer's inputs
    (text length from ``encoder_hidden_states``, output grid and reference length from
    ``img_ids``, step from ``timestep``, device from ``hidden_states``).  The original processor
    objects are restored on exit, also when the call raises (a stop included).  torch.compile: the
    pre-hook is `torch.compiler.disable`d and runs outside the compiled region, whole-model or
    regional (see `install_omnigen`)."""
    import inspect

    transformer = getattr(transformer, "_orig_mod", transformer)
    modules = flux_attention_modules(transformer)
    unknown = sorted(i for i in state.layers if not 0 <= i < len(modules))
    if unknown:
        raise ValueError(f"this FLUX transformer has {len(modules)} attention layers; it has no layer {unknown[0]}")
    originals = [(module, module.get_processor()) for module in modules]
    signature = inspect.signature(transformer.forward)
    layouts: dict[int, tuple] = {}  # id(img_ids) -> layout: the pipeline passes the same ids at every step

    @torch.compiler.disable
    def hook(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        hidden, text, img_ids = bound["hidden_states"], bound["encoder_hidden_states"], bound["img_ids"]
        cached = layouts.get(id(img_ids))
        if cached is None or cached[0] is not img_ids:
            cached = layouts[id(img_ids)] = (img_ids, *flux_kontext_image_layout(img_ids))
        _, grid, n_reference = cached
        if hidden.shape[1] != grid[0] * grid[1] + n_reference:
            raise ValueError(f"{hidden.shape[1]} image tokens, but the position ids describe "
                             f"{grid[0] * grid[1] + n_reference}")
        state.begin_forward(batch_size=hidden.shape[0], n_txt=text.shape[1], out_grid=grid, n_reference=n_reference,
                            timestep=bound.get("timestep"), device=hidden.device)
        return None

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, (module, stock) in enumerate(originals):
            if i in state.layers:
                module.set_processor(SaaSFluxKontextProcessor(state, i, stock))
        yield state
    finally:
        handle.remove()
        for module, processor in originals:
            module.set_processor(processor)


__all__ = [
    "GAIN_MODES",
    "PAPER_DEFAULTS",
    "SD_DEFAULTS",
    "PaperDefaults",
    "SDDefaults",
    "SaaSController",
    "SaaSFluxKontextProcessor",
    "SaaSFluxKontextState",
    "SaaSLoop",
    "SaaSOmniGenProcessor",
    "SaaSOmniGenState",
    "blur_minmax",
    "clip_spans",
    "compute_gains",
    "default_levels",
    "flux_attention_modules",
    "flux_kontext_image_layout",
    "gaussian_blur",
    "install_flux_kontext",
    "install_omnigen",
    "log_gain_bias",
    "offset_spans",
    "otsu_threshold",
    "part_masks",
    "quantise8",
    "sd_layers",
    "sd_window",
    "span_indicator",
    "split_instruction",
    "validate_parts",
]
