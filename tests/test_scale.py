"""The lesson's claims at their scale: kopru explain's figures for CLIP-L/336 + Vicuna-7B against hand-computed
ones, and the speed measurement's models (positions per strategy, shared backbones, timings per repeat)."""

from __future__ import annotations

import pytest
import torch

from kopru.lesson.scale import SPEED_SETUPS, STRATEGIES, build_speed_models, lesson_structure, measure_speed

# Vicuna-7B: 32 layers x 32 KV heads x head dim 128, K and V, 2 bytes in bfloat16.
VICUNA_KV_BYTES_PER_POSITION = 2 * 32 * 32 * 128 * 2


@pytest.mark.slow
def test_lesson_structure_at_clip_l_vicuna_7b():
    found = lesson_structure()
    # docs/explain.md's table (kopru explain --preset ...), the lesson's ordering: ~10M < ~150M < ~1B.
    assert [found[s]["trainable_align"] for s in STRATEGIES] == [4_198_400, 104_773_120, 1_623_267_344]
    assert [found[s]["llm_positions"] for s in STRATEGIES] == [576 + 2, 32 + 2, 1 + 2]
    assert [found[s]["cross_attention_kv"] for s in STRATEGIES] == [0, 0, 576]
    assert found["projection"]["kv_bytes_per_image"] == 578 * VICUNA_KV_BYTES_PER_POSITION
    # Cross-attention: its 3 text positions, plus K/V of 576 patches in 8 blocks (every 4th of 32 layers).
    assert found["cross_attention"]["kv_bytes_per_image"] == (3 * VICUNA_KV_BYTES_PER_POSITION
                                                              + 576 * 2 * 8 * 32 * 128 * 2)
    flops = [found[s]["flops_per_image"] for s in STRATEGIES]
    # 576 positions through ~6.5G dense weights at 2 FLOPs per multiply-add dominate the projection's cost.
    assert flops[0] > 2 * 576 * 6.5e9 and flops[0] > 5 * max(flops[1:])


def test_speed_models_share_one_encoder_and_llm():
    built = build_speed_models(SPEED_SETUPS["tiny"], torch.device("cpu"))
    models = [built[s][0] for s in STRATEGIES]
    assert models[0].llm is models[1].llm is models[2].llm
    assert models[0].vision is models[1].vision is models[2].vision
    # 32 px / 8 px patches = 16 patches: all of them (+ 2 markers), 4 queries (+ 2), one placeholder (+ 2).
    assert [m.image_count.llm_positions for m in models] == [18, 6, 3]
    for strategy in STRATEGIES:
        model, batch = built[strategy]
        assert batch["input_ids"].shape[1] == 1 + model.image_count.llm_positions + 4
    # A text-only call through the shared LLM is the plain LLM: the cross-attention blocks run only when a
    # call carries their image context.
    ids = built["projection"][1]["input_ids"][:, -4:]
    with torch.no_grad():
        plain = models[0].llm(input_ids=ids).logits
        after = models[2].llm(input_ids=ids).logits
    assert torch.equal(plain, after)


def test_speed_reports_every_repeat():
    result = measure_speed("tiny", torch.device("cpu"))
    assert set(result["strategies"]) == set(STRATEGIES)
    for timing in result["strategies"].values():
        for key in ("ttft_ms", "decode_tokens_per_s"):
            values = timing[key]["values"]
            assert len(values) == SPEED_SETUPS["tiny"].repeats and all(v > 0 for v in values)
            assert timing[key]["min"] <= timing[key]["median"] <= timing[key]["max"]
