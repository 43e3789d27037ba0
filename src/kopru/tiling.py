"""Llama-3.2-Vision (Mllama) tiling: how one image becomes up to `max_tiles` square tiles, as HF's
`MllamaImageProcessor` does it (transformers' image_processing_mllama.py), step for step:

1. `optimal_tiled_canvas`: of every arrangement of rows x columns tiles with rows * columns <= max_tiles, the one
   whose canvas needs the smallest upscale of the image (scale >= 1), else the largest downscale; ties go to the
   smallest canvas area.
2. `size_fit_to_canvas`: the image resized keeping its aspect ratio, each side first clipped into [tile, canvas].
3. padded with zeros (black) at the bottom and right to the canvas, and cut into tiles row by row.
4. `aspect_ratio_ids` (1-based index of (rows, columns) in `supported_aspect_ratios(max_tiles)`, 0 = no image)
   and `aspect_ratio_mask` (1 for an image's tiles; tile 0 always 1, as HF sets it even for padding images).

The arithmetic lives here once: `kopru.high_resolution.plan_image` counts tiles from it (so the processor, the
model and `kopru budget` agree), `TiledPreprocessor` makes the pixels. Per-tile normalisation is the encoder's own
`ImagePreprocessor.normalize`, so this step composes with however that is configured.

Sizes are (height, width) inside functions, as in `kopru.resolution`. HF names the arrangements (width, height)
in a docstring but uses them as (rows, columns) everywhere; so do we.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from PIL import Image

from kopru.image_processing import _RESAMPLE, ImagePreprocessor

MLLAMA_RESAMPLE = Image.Resampling.BILINEAR  # MllamaImageProcessor's default when a config names none


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


def aspect_ratio_inputs(layouts: list[TileLayout], max_tiles: int, device: torch.device | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the encoder's `aspect_ratio_ids` [images] and `aspect_ratio_mask` [images, max_tiles]."""
    for index, layout in enumerate(layouts):
        if layout.num_tiles > max_tiles:
            raise ValueError(f"image {index} is laid out in {layout.tiles[0]}x{layout.tiles[1]} = {layout.num_tiles} "
                             f"tiles; expected at most max_tiles = {max_tiles}")
    ids = torch.tensor([layout.aspect_ratio_id for layout in layouts], dtype=torch.long, device=device)
    tiles = torch.tensor([layout.num_tiles for layout in layouts], dtype=torch.long, device=device)
    mask = (torch.arange(max_tiles, device=device) < tiles.unsqueeze(1)).long()
    return ids, mask


def batch_aspect_ratio_inputs(layouts_per_sample: list[list[TileLayout]], max_tiles: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's batch layout: `aspect_ratio_ids` [batch, max images] (0 pads) and `aspect_ratio_mask`
    [batch, max images, max_tiles] (tile 0 set even for padding images, as HF's `build_aspect_ratio_mask`)."""
    most = max((len(layouts) for layouts in layouts_per_sample), default=0)
    ids = torch.zeros(len(layouts_per_sample), most, dtype=torch.long)
    mask = torch.zeros(len(layouts_per_sample), most, max_tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    for row, layouts in enumerate(layouts_per_sample):
        if layouts:
            ids[row, :len(layouts)], mask[row, :len(layouts)] = aspect_ratio_inputs(layouts, max_tiles)
    return ids, mask


def split_to_tiles(canvas: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """[C, rows * S, columns * S] -> [rows * columns, C, S, S], tiles row by row (HF's `split_to_tiles`)."""
    channels, height, width = canvas.shape
    tile_height, tile_width = height // rows, width // columns
    tiles = canvas.view(channels, rows, tile_height, columns, tile_width).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * columns, channels, tile_height, tile_width)


class TiledPreprocessor:
    """Images -> Mllama tiles. `base` supplies the per-tile normalisation and the resampling filter; the tile
    size is the encoder's `tile_size`, the tile count at most `max_tiles` (the encoder's `max_num_tiles`, which
    is also how many tiles every image is padded to: the encoder's reshapes assume it)."""

    def __init__(self, base: ImagePreprocessor, tile_size: int, max_tiles: int) -> None:
        self.base = base
        self.tile_size = tile_size
        self.max_tiles = max_tiles

    def layout(self, image: Image.Image) -> TileLayout:
        return tile_layout(image.height, image.width, self.tile_size, self.max_tiles)

    def tiles(self, image: Image.Image) -> torch.Tensor:
        """One image -> its own tiles [rows * columns, 3, S, S], normalised."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, found {type(image).__name__}")
        image = image.convert("RGB")
        layout = self.layout(image)
        height, width = layout.resized
        resample = _RESAMPLE.get(self.base.resample, MLLAMA_RESAMPLE)
        canvas = Image.new("RGB", (layout.canvas[1], layout.canvas[0]))  # zero pixels; HF pads with 0 before
        canvas.paste(image.resize((width, height), resample), (0, 0))  # rescaling, i.e. black, normalised
        return split_to_tiles(self.base.normalize(canvas), *layout.tiles)

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Köprü's layout: `pixel_values` [images, max_tiles, 3, S, S] (zero tiles after an image's own) and
        `image_sizes` [images, 2] = original (height, width), from which the model re-plans every image."""
        pixels = torch.zeros(len(images), self.max_tiles, 3, self.tile_size, self.tile_size)
        for index, image in enumerate(images):
            tiles = self.tiles(image)
            pixels[index, :tiles.shape[0]] = tiles
        sizes = torch.tensor([[image.height, image.width] for image in images], dtype=torch.long).view(-1, 2)
        return {"pixel_values": pixels, "image_sizes": sizes}

    def hf_inputs(self, images_per_sample: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """HF's `MllamaImageProcessor` layout for a batch: `pixel_values` [batch, max images, max_tiles, 3, S, S],
        `aspect_ratio_ids` [batch, max images], `aspect_ratio_mask` [batch, max images, max_tiles]."""
        most = max((len(images) for images in images_per_sample), default=0)
        pixels = torch.zeros(len(images_per_sample), most, self.max_tiles, 3, self.tile_size, self.tile_size)
        for row, images in enumerate(images_per_sample):
            if images:
                pixels[row, :len(images)] = self(images)["pixel_values"]
        ids, mask = batch_aspect_ratio_inputs([[self.layout(image) for image in images]
                                               for images in images_per_sample], self.max_tiles)
        return {"pixel_values": pixels, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}
