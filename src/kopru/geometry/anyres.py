"""LLaVA-NeXT "anyres" arithmetic: how many vision tokens an image of a given size becomes, with no pixels touched.

Pick the grid pinpoint that keeps the most of the image, cut it into base-size tiles, add a base view of the
whole image, drop the padding rows/columns and add one newline per grid row. Computed here once so the processor
(which expands placeholders), the model (which produces features) and the budget planner can never disagree.

Sizes follow the HF convention inside functions: (height, width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kopru.config import ResolutionConfig

# LLaVA-NeXT's pinpoints in tiles (rows, columns): 336x672, 672x336, 672x672, 1008x336, 336x1008 at 336 px.
LLAVA_NEXT_TILE_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
# LLaVA-NeXT's default grid pinpoints, (height, width) in pixels: the tile grids at its 336 px tiles.
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = tuple((rows * 336, columns * 336)
                                                          for rows, columns in LLAVA_NEXT_TILE_GRIDS)


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) keeping the most of the image's pixels; ties go to the least wasted area."""
    best, best_effective, best_wasted = None, 0, math.inf
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_width * pin_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_height, pin_width), effective, wasted
    if best is None:
        raise ValueError(f"expected at least one grid pinpoint and a non-empty image, found {pinpoints} for "
                         f"{width}x{height}")
    return best


def unpadded_grid(height: int, width: int, grid_height: int, grid_width: int) -> tuple[int, int]:
    """Patch rows and columns of a `grid_height` x `grid_width` patch grid that hold the image, not padding.

    The image was resized to fit the grid and padded symmetrically; this removes the padding, rounding as
    HF's LLaVA-NeXT model does (`int(round(x, 7))`), so counts equal its features exactly.
    """
    if width / height > grid_width / grid_height:
        new_height = int(round(height * (grid_width / width), 7))
        grid_height -= (grid_height - new_height) // 2 * 2
    else:
        new_width = int(round(width * (grid_height / height), 7))
        grid_width -= (grid_width - new_width) // 2 * 2
    return grid_height, grid_width


@dataclass(frozen=True)
class AnyresLayout:
    """Where an anyres image's tokens come from."""

    best_resolution: tuple[int, int]  # (height, width) the image is resized and padded to
    tiles: tuple[int, int]  # tile rows, tile columns
    base_tokens: int  # the base view (whole image at the encoder's size)
    grid: tuple[int, int]  # unpadded patch rows, columns of the tiled view
    newline: bool

    @property
    def grid_tokens(self) -> int:
        rows, columns = self.grid
        return rows * columns + (rows if self.newline else 0)

    @property
    def tokens(self) -> int:
        return self.base_tokens + self.grid_tokens


def anyres_layout(height: int, width: int, tile_size: int = 336, patches_per_side: int = 24,
                  pinpoints=LLAVA_NEXT_PINPOINTS, base_tokens: int | None = None, newline: bool = True) -> AnyresLayout:
    """LLaVA-NeXT's token layout for an image of `height` x `width` pixels.

    `patches_per_side` is the tokens per tile side the connector receives (24 for CLIP-L/336);
    `base_tokens` defaults to patches_per_side ** 2.
    """
    best_height, best_width = select_best_resolution(height, width, pinpoints)
    tile_rows, tile_columns = best_height // tile_size, best_width // tile_size
    rows, columns = unpadded_grid(height, width, tile_rows * patches_per_side, tile_columns * patches_per_side)
    base = patches_per_side**2 if base_tokens is None else base_tokens
    return AnyresLayout((best_height, best_width), (tile_rows, tile_columns), base, (rows, columns), newline)


def anyres_pinpoints(resolution: ResolutionConfig, tile: int) -> list[list[int]]:
    """The grid pinpoints (height, width) in pixels, checked to be whole tiles of the encoder's size."""
    if resolution.grid_pinpoints is None:
        return [[rows * tile, columns * tile] for rows, columns in LLAVA_NEXT_TILE_GRIDS]
    bad = [p for p in resolution.grid_pinpoints if p[0] % tile or p[1] % tile]
    if bad:
        raise ValueError(
            f"anyres grid_pinpoints must be multiples of the encoder's image size {tile}, found {bad}"
        )
    return resolution.grid_pinpoints
