"""High resolution: how one image becomes encoder passes (the plan), their pixels, and the token reduction.

`plan_image` turns an image size into an `ImagePlan` from the configs alone: how many encoder passes (1, or a
base view plus tiles for anyres), at which pixel size, and the patch grid each pass hands to the connector after
the k x k reduction. `kopru.tokens.image_positions` counts from the plan, `HighResolutionPreprocessor` makes its
pixels and the model produces its features, so the three cannot disagree.

Sizes are (height, width) inside functions, as in `kopru.resolution`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import torch
from PIL import Image
from torch import nn
from transformers import PretrainedConfig

from kopru.config import KopruConfig, ResolutionConfig
from kopru.connectors import strategy_class
from kopru.image_processing import ImagePreprocessor
from kopru.resolution import (
    QWEN2_VL_MAX_PIXELS,
    QWEN2_VL_MIN_PIXELS,
    AnyresLayout,
    anyres_layout,
    smart_resize,
)
from kopru.tiling import TiledPreprocessor, TileLayout, supported_aspect_ratios, tile_layout
from kopru.vision import VISION_BACKBONES, vision_config_of

TILED_ENCODERS = ("mllama_vision_model",)  # encoders with tile position embeddings (resolution mode "tiled")

# LLaVA-NeXT's pinpoints in tiles (rows, columns): 336x672, 672x336, 672x672, 1008x336, 336x1008 at 336 px.
LLAVA_NEXT_TILE_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


@dataclass(frozen=True)
class EncoderGeometry:
    """What the plan needs from the encoder: its native size, its patch size, whether a CLS token stays."""

    image_size: int
    patch_size: int
    keeps_cls: bool

    @classmethod
    def of(cls, config: KopruConfig, encoder_config: PretrainedConfig) -> EncoderGeometry:
        encoder_config = vision_config_of(encoder_config)
        has_cls = VISION_BACKBONES[encoder_config.model_type].has_cls
        drop_cls = has_cls if config.vision.drop_cls is None else config.vision.drop_cls
        return cls(encoder_config.image_size, encoder_config.patch_size, has_cls and not drop_cls)


@dataclass(frozen=True)
class ImagePlan:
    """Encoder passes of one image and the patch grid each leaves after reduction."""

    passes: int  # encoder forward passes (anyres: 1 base view + tiles)
    pass_size: tuple[int, int]  # (height, width) in pixels of every pass
    grid: tuple[int, int]  # patch rows, columns per pass after the k x k reduction
    cls_tokens: int  # CLS tokens per pass kept in front of the grid (never with a reduction or grid packing)
    layout: AnyresLayout | None = None  # anyres only
    tiling: TileLayout | None = None  # tiled only: passes = its tiles, all seen by the encoder together

    @property
    def tokens_per_pass(self) -> int:
        """Vision tokens one pass hands to the connector."""
        return self.grid[0] * self.grid[1] + self.cls_tokens


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


def packs_anyres_grid(config: KopruConfig) -> bool:
    """anyres with a connector whose output is the patch grid, spliced into the text: LLaVA-NeXT's unpadded grid
    with a newline per row. Other connectors read each view on its own and their outputs are concatenated."""
    connector = strategy_class(config.strategy)
    return config.resolution.mode == "anyres" and connector.splices_into_text and connector.keeps_patch_grid(
        config.connector)


def plan_image(config: KopruConfig, encoder_config: PretrainedConfig, height: int, width: int) -> ImagePlan:
    """How an image of `height` x `width` pixels goes through the encoder under `config.resolution`."""
    if not (isinstance(height, Integral) and isinstance(width, Integral)) or height < 1 or width < 1:
        raise ValueError(f"expected an image of at least 1x1 pixels, found {width}x{height} (width x height)")
    height, width = int(height), int(width)
    geometry = EncoderGeometry.of(config, encoder_config)
    resolution = config.resolution
    merge = resolution.merge_size
    patch, size = geometry.patch_size, geometry.image_size
    if geometry.keeps_cls and (merge > 1 or packs_anyres_grid(config)):
        why = "a k x k reduction" if merge > 1 else "anyres with the projection strategy (LLaVA-NeXT's unpadded grid)"
        raise ValueError(
            f"{why} needs a pure patch grid, found an encoder whose CLS token is kept (vision.drop_cls=False); "
            "drop it or use no reduction"
        )
    cls_tokens = int(geometry.keeps_cls)
    if resolution.mode == "dynamic":
        min_pixels = QWEN2_VL_MIN_PIXELS if resolution.min_pixels is None else resolution.min_pixels
        max_pixels = QWEN2_VL_MAX_PIXELS if resolution.max_pixels is None else resolution.max_pixels
        new_height, new_width = smart_resize(height, width, patch * merge, min_pixels, max_pixels)
        grid = (new_height // patch // merge, new_width // patch // merge)
        return ImagePlan(1, (new_height, new_width), grid, cls_tokens)
    side = size // patch
    if side % merge:
        raise ValueError(
            f"reduction_factor {merge} must divide the encoder's {side} patches per side ({size} px / {patch} px)"
        )
    side //= merge
    if resolution.mode == "fixed":
        return ImagePlan(1, (size, size), (side, side), cls_tokens)
    if resolution.mode == "tiled":
        tiling = tile_layout(height, width, size, max_tiles(encoder_config))
        return ImagePlan(tiling.num_tiles, (size, size), (side, side), cls_tokens, tiling=tiling)
    layout = anyres_layout(height, width, tile_size=size, patches_per_side=side,
                           pinpoints=anyres_pinpoints(resolution, size))
    rows, columns = layout.tiles
    return ImagePlan(1 + rows * columns, (size, size), (side, side), cls_tokens, layout)


def max_tiles(encoder_config: PretrainedConfig) -> int:
    """Tiles per image of a tiled encoder (its `max_num_tiles`), after checking that its aspect-ratio embeddings
    are indexed as `kopru.tiling` (and HF's processor) number the arrangements."""
    encoder_config = vision_config_of(encoder_config)
    if encoder_config.model_type not in TILED_ENCODERS:
        raise ValueError(f"resolution mode 'tiled' needs an encoder with tile position embeddings "
                         f"(model_type {list(TILED_ENCODERS)}), found {encoder_config.model_type!r}")
    tiles = encoder_config.max_num_tiles
    expected = [list(ratio) for ratio in supported_aspect_ratios(tiles)]
    found = [list(ratio) for ratio in encoder_config.supported_aspect_ratios]
    if found != expected:
        raise ValueError(f"expected the encoder's supported_aspect_ratios to be every (rows, columns) of at most "
                         f"max_num_tiles={tiles} tiles in HF's order, {expected}; found {found}")
    return tiles


# ------------------------------------------------------------------------------------------------ pixels
class HighResolutionPreprocessor:
    """Pixels for anyres and dynamic resolution; normalisation is the encoder's own `ImagePreprocessor`.

    anyres (as HF's LlavaNextImageProcessor): the whole image squashed to the tile size first, then the image
    resized to fit the best pinpoint keeping its aspect ratio, padded with black symmetrically and cut into
    tiles row by row -> `pixel_values` [images, 1 + most tiles, 3, tile, tile], zero tiles after an image's own.
    dynamic: the image resized to its `smart_resize` size -> [images, 3, tallest, widest], zero padded at the
    bottom and right. tiled: Llama-3.2-Vision's tiles (`kopru.tiling.TiledPreprocessor`) -> [images, max_tiles,
    3, tile, tile]. All return `image_sizes` [images, 2] = the original (height, width), from which the model
    re-plans every image.
    """

    def __init__(self, base: ImagePreprocessor, config: KopruConfig, encoder_config: PretrainedConfig) -> None:
        if config.resolution.mode == "fixed":
            raise ValueError("HighResolutionPreprocessor serves resolution modes 'anyres', 'dynamic' and 'tiled', "
                             "found 'fixed'")
        self.base = base
        self.config = config
        self.encoder_config = vision_config_of(encoder_config)
        self.tiled = None
        if config.resolution.mode == "tiled":  # Mllama's canvas, resize, pad and split (kopru.tiling)
            self.tiled = TiledPreprocessor(base, self.encoder_config.image_size, max_tiles(self.encoder_config))

    def plan(self, image: Image.Image) -> ImagePlan:
        return plan_image(self.config, self.encoder_config, image.height, image.width)

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected a PIL.Image.Image, found {type(image).__name__}")
        if self.tiled is not None:
            return self.tiled(images)  # pixel_values [images, max_tiles, 3, S, S] and image_sizes
        sizes = torch.tensor([[image.height, image.width] for image in images], dtype=torch.long).view(-1, 2)
        if self.config.resolution.mode == "anyres":
            per_image = [self._anyres(image.convert("RGB")) for image in images]
        else:
            per_image = [self._dynamic(image.convert("RGB")) for image in images]
        return {"pixel_values": pad_stack(per_image), "image_sizes": sizes}

    def _resample(self) -> Image.Resampling:
        return self.base.resample_filter

    def _anyres(self, image: Image.Image) -> torch.Tensor:
        plan = self.plan(image)
        tile = plan.pass_size[0]
        best_height, best_width = plan.layout.best_resolution
        # Resize to fit the pinpoint keeping the aspect ratio, then pad with black: HF's get_patch_output_size,
        # float arithmetic included, so that the pixels equal HF's.
        scale_width, scale_height = best_width / image.width, best_height / image.height
        if scale_width < scale_height:
            new_width, new_height = best_width, min(math.ceil(image.height * scale_width), best_height)
        else:
            new_height, new_width = best_height, min(math.ceil(image.width * scale_height), best_width)
        canvas = Image.new("RGB", (best_width, best_height))
        canvas.paste(image.resize((new_width, new_height), self._resample()),
                     ((best_width - new_width) // 2, (best_height - new_height) // 2))
        views = [image.resize((tile, tile), self._resample())]
        views += [canvas.crop((left, top, left + tile, top + tile))
                  for top in range(0, best_height, tile) for left in range(0, best_width, tile)]
        return torch.stack([self.base.normalize(view) for view in views])

    def _dynamic(self, image: Image.Image) -> torch.Tensor:
        height, width = self.plan(image).pass_size
        return self.base.normalize(image.resize((width, height), self._resample()))


def pad_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack tensors of equal rank, zero padding every dimension at its end to the largest."""
    if not tensors:
        return torch.empty(0)
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors), strict=True)]
    out = tensors[0].new_zeros(len(tensors), *shape)
    for index, tensor in enumerate(tensors):
        out[(index, *(slice(0, n) for n in tensor.shape))] = tensor
    return out


# ---------------------------------------------------------------------------------------------- reduction
class TokenReduction(nn.Module):
    """k x k patch reduction on a [images, rows * columns, dim] grid, before the connector. k = 1: unchanged."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def output_dim(self, dim: int) -> int:
        return dim

    def blocks(self, features: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """[N, rows * columns, D] -> [N, rows / k, columns / k, k * k, D]: each output token's k x k block, its
        patches in row-major order."""
        k = self.factor
        if rows % k or columns % k or features.shape[1] != rows * columns:
            raise ValueError(
                f"a {k}x{k} reduction needs a patch grid divisible by {k}; found {features.shape[1]} tokens for a "
                f"{rows}x{columns} grid"
            )
        n, _, dim = features.shape
        grid = features.view(n, rows // k, k, columns // k, k, dim).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(n, rows // k, columns // k, k * k, dim)

    def forward(self, features: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        return features


class PixelShuffle(TokenReduction):
    """Fold each k x k block into one token k^2 wider (Idefics3, InternVL, Qwen2-VL's merge before its MLP)."""

    def output_dim(self, dim: int) -> int:
        return dim * self.factor**2

    def forward(self, features: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        return self.blocks(features, rows, columns).flatten(3).flatten(1, 2)


class AveragePool(TokenReduction):
    """Average each k x k block into one token of the same width."""

    def forward(self, features: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        return self.blocks(features, rows, columns).mean(3).flatten(1, 2)


TOKEN_REDUCTIONS: dict[str, type[TokenReduction]] = {
    "none": TokenReduction, "pixel_shuffle": PixelShuffle, "avg_pool": AveragePool,
}


def token_reduction(resolution: ResolutionConfig) -> TokenReduction:
    return TOKEN_REDUCTIONS[resolution.reduction](resolution.merge_size)


# ------------------------------------------------------------------------------------------------ packing
def pack_anyres(tile_features: torch.Tensor, layout: AnyresLayout, newline: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT's order of one image's features: the base view, then the tiled view's patch grid with the
    padding rows/columns removed, each grid row ended by `newline`.

    tile_features: [1 + tiles, side * side, dim] (base view first, tiles row by row) -> [layout.tokens, dim]
    """
    tile_rows, tile_columns = layout.tiles
    per_tile, dim = tile_features.shape[1:]
    side = round(per_tile**0.5)
    base, tiles = tile_features[0], tile_features[1:]
    grid = tiles.view(tile_rows, tile_columns, side, side, dim).permute(0, 2, 1, 3, 4)
    grid = grid.reshape(tile_rows * side, tile_columns * side, dim)
    rows, columns = layout.grid
    top, left = (grid.shape[0] - rows) // 2, (grid.shape[1] - columns) // 2
    grid = grid[top:top + rows, left:left + columns]
    if layout.newline:
        grid = torch.cat([grid, newline.to(grid.dtype).expand(rows, 1, dim)], dim=1)
    return torch.cat([base, grid.reshape(-1, dim)])
