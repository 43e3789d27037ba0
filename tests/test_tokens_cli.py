"""Token accounting by hand, and the command line end to end."""

from __future__ import annotations

import pytest
from transformers import CLIPVisionConfig, SiglipVisionConfig, ViTConfig

from kopru import KopruConfig, VisionTowerConfig, count_image_tokens
from kopru.connectors.cross_attention import CrossAttentionConfig
from kopru.connectors.resampler import ResamplerConfig
from kopru.demo import run_demo
from kopru.vision import vision_token_count


def _config(strategy: str, connector=None, markers: bool = True) -> KopruConfig:
    return KopruConfig(
        vision=VisionTowerConfig("unused"), llm="unused", strategy=strategy, connector=connector,
        image_start_token="<image_start>" if markers else None, image_end_token="<image_end>" if markers else None,
    )


def test_llava_15_geometry_gives_576_positions():
    clip_l_336 = CLIPVisionConfig(image_size=336, patch_size=14)
    tokens = vision_token_count(clip_l_336, VisionTowerConfig("unused"))
    assert tokens == 24 * 24  # the CLS token is dropped
    count = count_image_tokens(_config("projection", markers=False), tokens)
    assert (count.placeholders, count.markers, count.llm_positions, count.cross_attention_kv) == (576, 0, 576, 0)
    assert count_image_tokens(_config("projection"), tokens).llm_positions == 578


def test_cls_is_dropped_only_where_the_encoder_has_one():
    tower = VisionTowerConfig("unused")
    assert vision_token_count(SiglipVisionConfig(image_size=224, patch_size=14), tower) == 256
    assert vision_token_count(ViTConfig(image_size=224, patch_size=16), tower) == 196
    keep = VisionTowerConfig("unused", drop_cls=False)
    assert vision_token_count(ViTConfig(image_size=224, patch_size=16), keep) == 197


def test_qformer_and_cross_attention_counts():
    assert count_image_tokens(_config("qformer", {"num_queries": 32}), 576).llm_positions == 34
    cross = count_image_tokens(_config("cross_attention", CrossAttentionConfig(), markers=False), 1025)
    assert (cross.llm_positions, cross.cross_attention_kv) == (1, 1025)
    resampled = CrossAttentionConfig(resampler=ResamplerConfig(num_latents=64))
    assert count_image_tokens(_config("cross_attention", resampled, markers=False), 576).cross_attention_kv == 64


def test_unknown_strategy_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown strategy 'bridge'.*cross_attention.*projection.*qformer"):
        _config("bridge")


def test_config_json_round_trip(tmp_path):
    config = _config("cross_attention", {"layers": [3, 8], "resampler": {"num_latents": 16}})
    config.save(tmp_path / "c.json")
    loaded = KopruConfig.load(tmp_path / "c.json")
    assert loaded == config
    assert isinstance(loaded.connector.resampler, ResamplerConfig)
    with pytest.raises(ValueError, match="no field"):
        KopruConfig.from_dict({**config.to_dict(), "connecter": {}})


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
