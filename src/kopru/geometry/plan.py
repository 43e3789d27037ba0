"""The plan: how one image becomes encoder passes, from the configs alone.

`plan_image` turns an image size into an `ImagePlan`: how many encoder passes (1; a base view plus tiles for
anyres; the tiles of a tiled encoder), at which pixel size, and the patch grid each pass hands to the connector
after the k x k reduction, with the CLS rule (`EncoderGeometry`: whether a CLS token stays is
`kopru.vision.keeps_cls`, next to the encoder facts it reads; a kept one is refused with a reduction or a packed
anyres grid, which need a pure patch grid). `kopru.geometry.image_positions` counts from the plan,
`kopru.high_resolution_processing.HighResolutionPreprocessor` makes its pixels and the model produces its
features, so the three cannot disagree.

Sizes are (height, width) inside functions, as in the rest of `kopru.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import TYPE_CHECKING

from kopru.connectors import strategy_class
from kopru.geometry.anyres import AnyresLayout, anyres_layout, anyres_pinpoints
from kopru.geometry.dynamic import QWEN2_VL_MAX_PIXELS, QWEN2_VL_MIN_PIXELS, smart_resize
from kopru.geometry.tiles import TileLayout, supported_aspect_ratios, tile_layout
from kopru.vision import keeps_cls, vision_config_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from kopru.config import KopruConfig

TILED_ENCODERS = ("mllama_vision_model",)  # encoders with tile position embeddings (resolution mode "tiled")


@dataclass(frozen=True)
class EncoderGeometry:
    """What the plan needs from the encoder: its native size, its patch size, whether a CLS token stays."""

    image_size: int
    patch_size: int
    keeps_cls: bool

    @classmethod
    def of(cls, config: KopruConfig, encoder_config: PretrainedConfig) -> EncoderGeometry:
        encoder_config = vision_config_of(encoder_config)
        return cls(encoder_config.image_size, encoder_config.patch_size, keeps_cls(encoder_config, config.vision))


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
    are indexed as `kopru.geometry.tiles` (and HF's processor) number the arrangements."""
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
