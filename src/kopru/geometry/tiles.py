"""Llama-3.2-Vision (Mllama) tile arithmetic: how one image becomes up to `max_tiles` square tiles, as HF's
`MllamaImageProcessor` does it (transformers' image_processing_mllama.py), step for step:

1. `optimal_tiled_canvas`: of every arrangement of rows x columns tiles with rows * columns <= max_tiles, the one
   whose canvas needs the smallest upscale of the image (scale >= 1), else the largest downscale; ties go to the
   smallest canvas area.
2. `size_fit_to_canvas`: the image resized keeping its aspect ratio, each side first clipped into [tile, canvas].
3. padded with zeros (black) at the bottom and right to the canvas, and cut into tiles row by row.
4. `aspect_ratio_ids` (1-based index of (rows, columns) in `supported_aspect_ratios(max_tiles)`, 0 = no image)
   and `aspect_ratio_mask` (1 for an image's tiles; tile 0 always 1, as HF sets it even for padding images).

Steps 1, 2 and the numbering of 4 live here once: `kopru.geometry.plan_image` counts tiles from them (so the
processor, the model and `kopru budget` agree); steps 3 and 4's tensors are `kopru.high_resolution_processing`'s
(`TiledPreprocessor`, `aspect_ratio_inputs`).

Sizes are (height, width) inside functions, as in the rest of `kopru.geometry`. HF names the arrangements
(width, height) in a docstring but uses them as (rows, columns) everywhere; so do we.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, columns) with rows * columns <= max_tiles, in HF's order (the order aspect-ratio ids follow)."""
    if not isinstance(max_tiles, int) or max_tiles < 1:
        raise ValueError(f"expected max_tiles to be a positive integer, found {max_tiles!r}")
    return tuple((rows, columns) for rows in range(1, max_tiles + 1) for columns in range(1, max_tiles + 1)
                 if rows * columns <= max_tiles)


def optimal_tiled_canvas(height: int, width: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """HF's `get_optimal_tiled_canvas`: the canvas (height, width) in pixels for an image of this size."""
    if height < 1 or width < 1:
        raise ValueError(f"expected an image of at least 1x1 pixels, found {width}x{height} (width x height)")
    arrangements = supported_aspect_ratios(max_tiles)
    # Same float64 divisions as HF's NumPy code, so equal scales (the tie-break) compare equal here too.
    scales = [min(rows * tile_size / height, columns * tile_size / width) for rows, columns in arrangements]
    upscales = [scale for scale in scales if scale >= 1]
    chosen = min(upscales) if upscales else max(scales)
    candidates = [arrangement for arrangement, scale in zip(arrangements, scales, strict=True) if scale == chosen]
    rows, columns = min(candidates, key=lambda grid: grid[0] * grid[1])  # first of equal areas, as np.argmin
    return rows * tile_size, columns * tile_size


def size_fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int,
                       tile_size: int) -> tuple[int, int]:
    """HF's `get_image_size_fit_to_canvas`: the resized (height, width), aspect ratio kept, never below 1 px."""
    target_width = min(max(width, tile_size), canvas_width)  # np.clip(width, tile_size, canvas_width)
    target_height = min(max(height, tile_size), canvas_height)
    scale_height, scale_width = target_height / height, target_width / width
    if scale_width < scale_height:
        return min(math.floor(height * scale_width) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_height) or 1, target_width)


@dataclass(frozen=True)
class TileLayout:
    """Where one image's pixels go: the canvas, its tile grid, and the size the image is resized to on it."""

    canvas: tuple[int, int]  # (height, width) pixels
    tiles: tuple[int, int]  # (rows, columns)
    resized: tuple[int, int]  # (height, width) of the image on the canvas (top-left; the rest is zero padding)
    max_tiles: int

    @property
    def num_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    @property
    def aspect_ratio_id(self) -> int:
        """1-based index of the arrangement among `supported_aspect_ratios(max_tiles)` (0 means no image)."""
        return supported_aspect_ratios(self.max_tiles).index(self.tiles) + 1


def tile_layout(height: int, width: int, tile_size: int, max_tiles: int) -> TileLayout:
    """The layout of a `height` x `width` image in tiles of `tile_size` pixels, at most `max_tiles` of them."""
    canvas_height, canvas_width = optimal_tiled_canvas(height, width, max_tiles, tile_size)
    resized = size_fit_to_canvas(height, width, canvas_height, canvas_width, tile_size)
    return TileLayout((canvas_height, canvas_width), (canvas_height // tile_size, canvas_width // tile_size),
                      resized, max_tiles)
