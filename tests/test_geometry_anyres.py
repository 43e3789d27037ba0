"""LLaVA-NeXT anyres arithmetic (kopru.geometry.anyres) against the check values in REFERENCE.md and HF's own
`select_best_resolution`."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

from kopru.geometry.anyres import LLAVA_NEXT_PINPOINTS, anyres_layout, select_best_resolution


@pytest.mark.parametrize(("width", "height", "tokens"), [(672, 672, 2928), (640, 480, 2340), (336, 336, 1176),
                                                         (1920, 1080, 1948)])
def test_anyres_check_values(width, height, tokens):
    assert anyres_layout(height, width).tokens == tokens


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000))
def test_best_resolution_equals_hf(height, width):
    pinpoints = [list(p) for p in LLAVA_NEXT_PINPOINTS]
    assert select_best_resolution(height, width, LLAVA_NEXT_PINPOINTS) == tuple(
        hf_select_best_resolution((height, width), pinpoints))
