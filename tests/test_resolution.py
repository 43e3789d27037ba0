"""Resolution arithmetic against the check values in REFERENCE.md and HF's own functions."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from kopru.resolution import (
    LLAVA_NEXT_PINPOINTS,
    anyres_layout,
    dynamic_tokens,
    select_best_resolution,
    smart_resize,
)


@pytest.mark.parametrize(("width", "height", "tokens"), [(672, 672, 2928), (640, 480, 2340), (336, 336, 1176),
                                                         (1920, 1080, 1948)])
def test_anyres_check_values(width, height, tokens):
    assert anyres_layout(height, width).tokens == tokens


@pytest.mark.parametrize(("width", "height", "tokens"), [(224, 224, 64), (672, 672, 576), (1920, 1080, 1222)])
def test_dynamic_check_values(width, height, tokens):
    assert dynamic_tokens(height, width) == tokens


def test_smart_resize_1080p():
    assert smart_resize(1080, 1920) == (728, 1316)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000))
def test_best_resolution_and_smart_resize_equal_hf(height, width):
    pinpoints = [list(p) for p in LLAVA_NEXT_PINPOINTS]
    assert select_best_resolution(height, width, LLAVA_NEXT_PINPOINTS) == tuple(
        hf_select_best_resolution((height, width), pinpoints))
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(height, width)
    else:
        assert smart_resize(height, width) == hf_smart_resize(height, width)
