"""Qwen2-VL dynamic-resolution arithmetic (kopru.geometry.dynamic) against the check values in REFERENCE.md and
HF's own `smart_resize`."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from kopru.geometry.dynamic import dynamic_tokens, smart_resize


@pytest.mark.parametrize(("width", "height", "tokens"), [(224, 224, 64), (672, 672, 576), (1920, 1080, 1222)])
def test_dynamic_check_values(width, height, tokens):
    assert dynamic_tokens(height, width) == tokens


def test_smart_resize_1080p():
    assert smart_resize(1080, 1920) == (728, 1316)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000))
def test_smart_resize_equals_hf(height, width):
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(height, width)
    else:
        assert smart_resize(height, width) == hf_smart_resize(height, width)
