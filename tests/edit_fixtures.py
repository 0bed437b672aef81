"""Comparisons the OmniGen and FLUX Kontext instruction-edit tests share (imported by those test
modules; pytest does not collect it)."""

from __future__ import annotations

import re

import numpy as np


def squash(text: str) -> str:
    """`text` without whitespace, lower-cased: how a decoded span is compared with its part."""
    return re.sub(r"\s+", "", text).lower()


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)
