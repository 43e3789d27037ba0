"""Image geometry: the only image size -> positions arithmetic, in ints and dataclasses (no tensors, no pixels).

    image size (height, width)
      │  plan.plan_image(config, encoder_config, height, width)        -> ImagePlan
      │     fixed:   one pass at the encoder's size
      │     anyres:  anyres.anyres_layout (LLaVA-NeXT pinpoints, unpadded grid, newlines)
      │     dynamic: dynamic.smart_resize (Qwen2-VL: multiples of patch x merge within a pixel budget)
      │     tiled:   tiles.tile_layout (Llama-3.2-Vision: best canvas of up to max_tiles tiles)
      │     + the CLS rule and the k x k reduction (plan.EncoderGeometry)
      ▼
    positions.image_positions(config, encoder_config, width, height) -> ImageTokenCount
          LLM positions (placeholders + markers) or cross-attention K/V per image

The processor expands placeholders, the model checks features and `kopru budget` / `kopru explain` count from
these functions, so none of them can disagree. Pixels are `kopru.high_resolution_processing`'s, the token
reductions and LLaVA-NeXT's feature packing `kopru.connectors.reduction`'s. Sizes are (height, width) inside
functions, as in HF.
"""

from kopru.geometry.anyres import (
    LLAVA_NEXT_PINPOINTS,
    LLAVA_NEXT_TILE_GRIDS,
    AnyresLayout,
    anyres_layout,
    anyres_pinpoints,
    select_best_resolution,
    unpadded_grid,
)
from kopru.geometry.dynamic import (
    QWEN2_VL_MAX_ASPECT_RATIO,
    QWEN2_VL_MAX_PIXELS,
    QWEN2_VL_MIN_PIXELS,
    dynamic_tokens,
    smart_resize,
)
from kopru.geometry.plan import (
    TILED_ENCODERS,
    EncoderGeometry,
    ImagePlan,
    max_tiles,
    packs_anyres_grid,
    plan_image,
)
from kopru.geometry.positions import (
    ImageTokenCount,
    cached_cross_attention_kv,
    connector_tokens,
    count_image_tokens,
    image_positions,
)
from kopru.geometry.tiles import (
    TileLayout,
    optimal_tiled_canvas,
    size_fit_to_canvas,
    supported_aspect_ratios,
    tile_layout,
)

__all__ = [
    "LLAVA_NEXT_PINPOINTS",
    "LLAVA_NEXT_TILE_GRIDS",
    "QWEN2_VL_MAX_ASPECT_RATIO",
    "QWEN2_VL_MAX_PIXELS",
    "QWEN2_VL_MIN_PIXELS",
    "TILED_ENCODERS",
    "AnyresLayout",
    "EncoderGeometry",
    "ImagePlan",
    "ImageTokenCount",
    "TileLayout",
    "anyres_layout",
    "anyres_pinpoints",
    "cached_cross_attention_kv",
    "connector_tokens",
    "count_image_tokens",
    "dynamic_tokens",
    "image_positions",
    "max_tiles",
    "optimal_tiled_canvas",
    "packs_anyres_grid",
    "plan_image",
    "select_best_resolution",
    "size_fit_to_canvas",
    "smart_resize",
    "supported_aspect_ratios",
    "tile_layout",
    "unpadded_grid",
]
