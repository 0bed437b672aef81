"""Pictures of maps: the one JET colouring and overlay that every task's heatmaps use.

A map here is a (h, w) float array; `[0, 1]` is the colour scale's range (values outside are
clipped, so a caller decides how to normalise: attention maps are already in [0, 1], a
difference image is scaled to its maximum, a raw attention thumbnail to its own min and max).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

__all__ = ["jet", "normalise", "overlay", "overlay_mask", "thumbnail"]


def jet(heat: np.ndarray) -> np.ndarray:
    """(h, w) map in [0, 1] -> (h, w, 3) uint8 RGB in OpenCV's JET colours (blue cold, red hot)."""
    levels = np.uint8(np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0, 1) * 255)
    return np.ascontiguousarray(cv2.applyColorMap(levels, cv2.COLORMAP_JET)[..., ::-1])


def normalise(heat: np.ndarray) -> np.ndarray:
    """The map min-max scaled to [0, 1] (a constant map becomes all zeros)."""
    heat = np.asarray(heat, dtype=np.float32)
    lo, hi = float(heat.min()), float(heat.max())
    return (heat - lo) / (hi - lo + 1e-8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """A [0, 1] map of the image's size drawn over `image` in JET colours, `alpha` opaque."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.uint8(base * (1 - alpha) + jet(heat).astype(np.float32) * alpha))


def thumbnail(heat: np.ndarray, side: int) -> Image.Image:
    """A map min-max scaled and coloured as a `side` px square, nearest upscaling (cells visible)."""
    return Image.fromarray(jet(normalise(heat))).resize((side, side), Image.NEAREST)


def overlay_mask(image: Image.Image, mask: np.ndarray, colour=(255, 40, 40), alpha: float = 0.5) -> Image.Image:
    """A boolean mask drawn over `image` in a translucent colour (e.g. the eraser's grown mask)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    tint = base * (1 - alpha) + np.asarray(colour, np.float32) * alpha
    return Image.fromarray(np.where(mask[..., None], tint, base).round().astype(np.uint8))
