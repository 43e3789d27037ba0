"""`kopru demo`: every strategy built, trained, generating and reloaded on the tiny built-in backbones."""

from __future__ import annotations

import pytest

from kopru.lesson.demo import run_demo


@pytest.mark.trained
@pytest.mark.slow
def test_demo_trains_generates_and_reloads(tmp_path, trained_seed, trained_figure):
    results = run_demo(tmp_path, steps=25, seed=trained_seed)
    assert [r.strategy for r in results] == ["projection", "qformer", "cross_attention"]
    for r in results:
        trained_figure(f"{r.strategy}/loss_drop", r.loss_before - r.loss_stage2)
        assert r.loss_stage2 < r.loss_before - 0.5, r  # training moved the loss
        assert r.reload_max_diff == 0.0  # save + load is exact
        assert 0 < r.trainable < r.total
    by_name = {r.strategy: r for r in results}
    assert by_name["projection"].llm_positions == 16 + 2  # 32 px / patch 8, CLS dropped, two markers
    assert by_name["qformer"].llm_positions == 8 + 2
    assert (by_name["cross_attention"].llm_positions, by_name["cross_attention"].cross_attention_kv) == (3, 16)
