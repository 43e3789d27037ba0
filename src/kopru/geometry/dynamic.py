"""Qwen2-VL dynamic-resolution arithmetic: `smart_resize` the image to multiples of patch x merge within a pixel
budget, then merge k x k neighbouring patches into one token. No pixels touched; the processor, the model and the
budget planner all count from here.

Sizes follow the HF convention inside functions: (height, width).
"""

from __future__ import annotations

import math

QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 1280
QWEN2_VL_MAX_ASPECT_RATIO = 200


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
