"""Boxes bound to words: parsing, validation, keyframe interpolation, and their masks on grids.

A box is ``WORD:x1,y1,x2,y2`` or ``WORD:x1,y1,x2,y2@FRAME`` (pixels of the source frames, FRAME
counted from 0 among the edited frames).  A word with one box keeps it on every frame (the
paper's static box); a word with boxes on several keyframes moves linearly between them and holds
the first / last box before / after them (our extension).  A box without ``@FRAME`` is the box of
frame 0.

Words are resolved to token positions of the edited prompt with the project's word/token map
(`pipelines.attention_maps.prompt_words` / `token_words`: the tokenizer's offsets), never by raw
token index; matching is case-insensitive, a word of several tokens keeps all of them (RAD takes
the max of their maps), and a word that occurs several times in the prompt binds every
occurrence.  Every problem is one sentence (`UserInputError`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..attention_maps import prompt_words, token_words
from ..errors import UserInputError

_BOX = re.compile(r"^\s*(?P<word>[^:]+?)\s*:\s*(?P<coords>[^@]+?)\s*(?:@\s*(?P<frame>[^@]+?)\s*)?$")


@dataclass(frozen=True)
class Box:
    word: str
    x1: float
    y1: float
    x2: float
    y2: float
    frame: int = 0


@dataclass
class Target:
    """One bound word: its token positions in the prompt and its (F, 4) per-frame box in pixels."""

    word: str
    positions: list[int]
    boxes: np.ndarray  # (F, 4) float64 x1, y1, x2, y2 of the source frames
    keyframes: list[int]


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserInputError(f"The box '{spec}' has {what} '{text.strip()}', which is not a number.") from None
    if not math.isfinite(value):
        raise UserInputError(f"The box '{spec}' has {what} '{text.strip()}'; use finite numbers.")
    return value


def parse_box(spec: str) -> Box:
    """A `Box` from ``WORD:x1,y1,x2,y2[@FRAME]``."""
    if not isinstance(spec, str):
        raise UserInputError(f"A box must be written WORD:x1,y1,x2,y2[@FRAME], not {spec!r}.")
    match = _BOX.match(spec)
    if match is None:
        raise UserInputError(f"The box '{spec}' is not of the form WORD:x1,y1,x2,y2[@FRAME].")
    coords = match["coords"].split(",")
    if len(coords) != 4:
        raise UserInputError(f"The box '{spec}' needs four numbers x1,y1,x2,y2, not {len(coords)}.")
    x1, y1, x2, y2 = (_number(c, "the coordinate", spec) for c in coords)
    frame = 0
    if match["frame"] is not None:
        value = _number(match["frame"], "the frame", spec)
        if value != int(value) or value < 0:
            raise UserInputError(f"The box '{spec}' names frame {match['frame']}; frames are whole numbers from 0.")
        frame = int(value)
    return Box(match["word"].strip(), x1, y1, x2, y2, frame)


def as_box(box) -> Box:
    """A `Box` from a Box, a string, or a (word, (x1, y1, x2, y2)[, frame]) tuple."""
    if isinstance(box, Box):
        return box
    if isinstance(box, str):
        return parse_box(box)
    try:
        word, coords, *rest = box
        x1, y1, x2, y2 = coords
        frame = rest[0] if rest else 0
    except (TypeError, ValueError):
        raise UserInputError(f"A box must be 'WORD:x1,y1,x2,y2[@FRAME]' or (word, (x1, y1, x2, y2)[, frame]), "
                             f"not {box!r}.") from None
    text = f"{word}:{x1},{y1},{x2},{y2}@{frame}"
    return parse_box(text)


def resolve(boxes, prompt: str, tokenizer, max_length: int, frames: int, size: tuple[int, int]) -> list[Target]:
    """The targets of `boxes` on a clip of `frames` frames of `size` = (width, height) pixels."""
    boxes = [as_box(b) for b in boxes or ()]
    width, height = size
    words = prompt_words(prompt)
    by_word: dict[str, list[Box]] = {}
    for box in boxes:
        label = f"'{box.word}:{box.x1:g},{box.y1:g},{box.x2:g},{box.y2:g}@{box.frame}'"
        if box.x2 <= box.x1 or box.y2 <= box.y1:
            raise UserInputError(f"The box {label} has zero area; x2 must exceed x1 and y2 exceed y1.")
        if box.x1 < 0 or box.y1 < 0 or box.x2 > width or box.y2 > height:
            raise UserInputError(f"The box {label} lies outside the {width}x{height} frame.")
        if box.frame >= frames:
            raise UserInputError(f"The box {label} names frame {box.frame}, but the clip has {frames} frames (0 to "
                                 f"{frames - 1}).")
        by_word.setdefault(box.word.lower(), []).append(box)
    if len(by_word) > len(words):
        raise UserInputError(f"There are boxes for {len(by_word)} words but the prompt has only {len(words)} "
                             f"word{'s' if len(words) != 1 else ''}.")
    owners, _ = token_words(tokenizer, prompt, max_length)
    targets = []
    for key, group in by_word.items():
        indices = [i for i, (w, _, _) in enumerate(words) if w.lower() == key]
        if not indices:
            raise UserInputError(f"The word '{group[0].word}' is not in the prompt; bind each box to a word of it.")
        positions = [p for p, owner in enumerate(owners) if owner in indices]
        if not positions:
            raise UserInputError(f"The word '{group[0].word}' lies beyond the model's {max_length} text tokens.")
        keyframes = sorted(b.frame for b in group)
        if len(set(keyframes)) != len(keyframes):
            raise UserInputError(f"The word '{group[0].word}' has two boxes on one frame; give one box per keyframe.")
        group = sorted(group, key=lambda b: b.frame)
        coords = np.array([[b.x1, b.y1, b.x2, b.y2] for b in group], dtype=np.float64)
        every = np.arange(frames)
        per_frame = np.stack([np.interp(every, keyframes, coords[:, j]) for j in range(4)], axis=1)
        targets.append(Target(group[0].word, positions, per_frame, keyframes))
    return targets


def scaled(targets: list[Target], sx: float, sy: float) -> list[Target]:
    """The targets with their boxes scaled by (sx, sy): source pixels -> working pixels."""
    factor = np.array([sx, sy, sx, sy])
    return [Target(t.word, t.positions, t.boxes * factor, t.keyframes) for t in targets]


def grid_masks(targets: list[Target], cell: float, grid: tuple[int, int]) -> torch.Tensor:
    """(K, F, h, w) bool masks of each target's per-frame box on a grid of `cell`-pixel cells.

    Corners are rounded to the nearest cell line (the reference's round(coordinate / 32)); a box
    that rounds to no cell keeps the one cell holding its centre, so no box is ever empty.
    """
    h, w = grid
    frames = targets[0].boxes.shape[0] if targets else 0
    masks = torch.zeros(len(targets), frames, h, w, dtype=torch.bool)
    for k, target in enumerate(targets):
        for f, (x1, y1, x2, y2) in enumerate(target.boxes):
            c1, r1 = min(int(round(x1 / cell)), w), min(int(round(y1 / cell)), h)
            c2, r2 = min(int(round(x2 / cell)), w), min(int(round(y2 / cell)), h)
            if c2 <= c1:  # narrower than a cell: the cell column holding its centre
                c1 = min(int((x1 + x2) / 2 / cell), w - 1)
                c2 = c1 + 1
            if r2 <= r1:
                r1 = min(int((y1 + y2) / 2 / cell), h - 1)
                r2 = r1 + 1
            masks[k, f, r1:r2, c1:c2] = True
    return masks


def union_mask(targets: list[Target], factor: int, grid: tuple[int, int]) -> torch.Tensor:
    """(F, h, w) float mask, 1 inside the union of every box on the latent grid (pixels / factor),
    cells the box touches included (floor of the start, ceiling of the end)."""
    h, w = grid
    frames = targets[0].boxes.shape[0]
    mask = torch.zeros(frames, h, w)
    for target in targets:
        for f, (x1, y1, x2, y2) in enumerate(target.boxes):
            c1, r1 = int(math.floor(x1 / factor)), int(math.floor(y1 / factor))
            c2, r2 = int(math.ceil(x2 / factor)), int(math.ceil(y2 / factor))
            mask[f, max(r1, 0):min(r2, h), max(c1, 0):min(c2, w)] = 1
    return mask
