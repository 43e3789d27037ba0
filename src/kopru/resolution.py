"""Resolution arithmetic: how many vision tokens an image of a given size becomes, with no pixels touched.

Two high-resolution schemes, each computed here once so the processor (which expands placeholders), the
model (which produces features) and the budget planner can never disagree:

- LLaVA-NeXT "anyres": pick the grid pinpoint that keeps the most of the image, cut it into base-size tiles,
  add a base view of the whole image, drop the padding rows/columns and add one newline per grid row.
- Qwen2-VL dynamic resolution: `smart_resize` the image to multiples of patch x merge within a pixel budget,
  then merge k x k neighbouring patches into one token.

Sizes follow the HF convention inside functions: (height, width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# LLaVA-NeXT's default grid pinpoints, (height, width) in pixels.
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 1280
QWEN2_VL_MAX_ASPECT_RATIO = 200


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


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = QWEN2_VL_MIN_PIXELS,
                 max_pixels: int = QWEN2_VL_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's resize target (height, width): multiples of `factor`, area within [min_pixels, max_pixels]."""
    if height < 1 or width < 1:
        raise ValueError(f"expected an image of at least 1x1 pixels, found {width}x{height} (width x height)")
    if max(height, width) / min(height, width) > QWEN2_VL_MAX_ASPECT_RATIO:
        raise ValueError(
            f"expected an aspect ratio of at most {QWEN2_VL_MAX_ASPECT_RATIO}, found "
            f"{max(height, width) / min(height, width):.1f} ({width}x{height}, width x height)"
        )
    new_height = round(height / factor) * factor
    new_width = round(width / factor) * factor
    if new_height * new_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_height = max(factor, math.floor(height / beta / factor) * factor)
        new_width = max(factor, math.floor(width / beta / factor) * factor)
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


def dynamic_tokens(height: int, width: int, patch_size: int = 14, merge_size: int = 2,
                   min_pixels: int = QWEN2_VL_MIN_PIXELS, max_pixels: int = QWEN2_VL_MAX_PIXELS) -> int:
    """Tokens of a Qwen2-VL-style image after smart_resize and the merge_size x merge_size token merge."""
    factor = patch_size * merge_size
    new_height, new_width = smart_resize(height, width, factor, min_pixels, max_pixels)
    return (new_height // factor) * (new_width // factor)
