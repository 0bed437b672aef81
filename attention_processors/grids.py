"""Token grids of attention layers, and resizing masks and maps onto them.

Image tokens of a layer form a grid derived from the latent size, never from sqrt(N), so every
aspect ratio works: a UNet level k has (ceil(H/2^k), ceil(W/2^k)) tokens, a DiT with patch p has
(H/p, W/p), FLUX's packed sequence is its own grid (factor 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_FACTORS = (1, 2, 4, 8, 16, 32, 64)


def token_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of `n_tokens` image tokens in a model whose input grid is `latent_hw`."""
    height, width = latent_hw
    for f in _FACTORS:
        h, w = math.ceil(height / f), math.ceil(width / f)
        if h * w == n_tokens:
            return h, w
    raise ValueError(f"{n_tokens} image tokens match no downsampling of the {height}x{width} latent grid")


def resize_to_grid(maps: torch.Tensor, grid: tuple[int, int], hard: bool = False) -> torch.Tensor:
    """Resize (..., H, W) masks or maps to `grid`.

    Hard (binary) masks use adaptive max-pooling when shrinking, so a thin object never vanishes
    from a coarse layer (dilating); soft maps use area averaging when shrinking and bilinear
    interpolation when growing.
    """
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    if tuple(x.shape[-2:]) != tuple(grid):
        shrinking = x.shape[-2] >= grid[0] and x.shape[-1] >= grid[1]
        if hard and shrinking:
            x = F.adaptive_max_pool2d(x, grid)
        elif hard:
            x = F.interpolate(x, size=grid, mode="nearest")
        elif shrinking:
            x = F.adaptive_avg_pool2d(x, grid)
        else:
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
    return x.reshape(*lead, *grid)


def mask_to_tokens(mask: torch.Tensor, grid: tuple[int, int], hard: bool = True) -> torch.Tensor:
    """A (..., H, W) mask as (..., h*w) per-token values for a layer with token grid `grid`."""
    return resize_to_grid(mask, grid, hard=hard).flatten(-2)


class GridSums:
    """Running sums of per-image-token values, one per token grid, resized together at the end.

    Layers at different resolutions give maps on different grids.  Resizing is linear, so the
    sum of the resized maps equals the resized sum: each layer call adds into its grid's sum
    (`add`), and `combined` reshapes and resizes each grid's sum once, bilinearly, however many
    layers and steps there were.  Memory is one buffer per grid size.
    """

    def __init__(self) -> None:
        self._sums: dict[tuple[int, int], torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self._sums)

    def add(self, grid: tuple[int, int], value: torch.Tensor) -> None:
        """Add (b, N, *rest) values of the N = h * w image tokens of `grid` (value is not changed)."""
        summed = self._sums.get(grid)
        if summed is None:
            self._sums[grid] = value.detach().clone()
        else:
            summed.add_(value)

    def at(self, grid: tuple[int, int]) -> torch.Tensor:
        """The raw (b, N, *rest) sum of one grid."""
        return self._sums[grid]

    def finest(self) -> tuple[int, int]:
        """The grid with the most tokens."""
        return max(self._sums, key=lambda g: g[0] * g[1])

    def combined(self, target: tuple[int, int] | None = None) -> torch.Tensor:
        """The sums as (b, *rest, *target) maps, each grid resized to `target` (default: the finest)."""
        if not self._sums:
            raise RuntimeError("no attention was captured: no selected layer ran")
        target = tuple(target or self.finest())
        total = 0
        for grid, summed in self._sums.items():
            total = total + grid_maps(summed, grid, target)
        return total


def grid_maps(values: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """(b, N, *rest) values of the N = h * w tokens of `grid` as (b, *rest, *target) maps, resized
    bilinearly (linear: resizing a sum equals summing the resized values)."""
    h, w = grid
    lead = values.shape[:1] + values.shape[2:]
    x = values.movedim(1, -1).reshape(-1, 1, h, w)
    if tuple(grid) != tuple(target):
        x = F.interpolate(x, size=tuple(target), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *target)
