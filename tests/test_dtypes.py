"""One dtype vocabulary and one KV-cache formula: `explain`, `budget`, `chat` and `serve` read the same names,
and explain's and budget's KV bytes for the same model are the same number."""

from __future__ import annotations

import pytest
import torch
from conftest import budget_json

from kopru.dtypes import NAMES, canonical_dtype, dtype_bytes, torch_dtype
from kopru.explain import explain


@pytest.mark.parametrize(("alias", "canonical", "size"), [("bf16", "bfloat16", 2), ("fp16", "float16", 2),
                                                          ("fp32", "float32", 4), ("fp8", "float8", 1),
                                                          ("int4", "int4", 0.5)])
def test_short_names_mean_the_long_ones(alias, canonical, size) -> None:
    assert canonical_dtype(alias) == canonical and dtype_bytes(alias) == dtype_bytes(canonical) == size


def test_unknown_and_storage_only_dtypes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown dtype 'fp12'; expected one of float32, .*bf16"):
        canonical_dtype("fp12")
    with pytest.raises(ValueError, match=r"a model runs in float32, bfloat16, float16; 'int4' is a storage format"):
        torch_dtype("int4")
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype(None) is None


def test_explain_and_budget_accept_the_same_names_and_count_the_same_kv_bytes(build, tmp_path) -> None:
    """A saved model, one image, every dtype name: explain's cache for `context` positions and budget's cache for
    the image's positions, both from the one formula, equal the bytes by hand for the tiny Llama."""
    model, processor = build("projection")
    model.save_pretrained(tmp_path / "m", processor)
    llm = model.llm.config
    head_dim = llm.hidden_size // llm.num_attention_heads
    for dtype in NAMES:
        explanation = explain(model_dir=tmp_path / "m", dtype=dtype, context=100, flops=False)
        image = budget_json("--model", str(tmp_path / "m"), "--image", "40x30", "--dtype", dtype)["images"][0]
        per_position = 2 * llm.num_hidden_layers * llm.num_key_value_heads * head_dim * dtype_bytes(dtype)  # K, V
        assert explanation.memory["kv_cache"] == 100 * per_position, dtype
        assert image["kv_cache_bytes"] == round(image["tokens"] * per_position), dtype
