"""Image positions counted by hand (kopru.geometry.positions): LLaVA-1.5's 576, Q-Former queries, cross-attention K/V."""

from __future__ import annotations

from conftest import counting_config
from transformers import CLIPVisionConfig

from kopru import VisionTowerConfig, count_image_tokens
from kopru.connectors.cross_attention import CrossAttentionConfig
from kopru.connectors.resampler import ResamplerConfig
from kopru.vision import vision_token_count


def test_llava_15_geometry_gives_576_positions():
    clip_l_336 = CLIPVisionConfig(image_size=336, patch_size=14)
    tokens = vision_token_count(clip_l_336, VisionTowerConfig("unused"))
    assert tokens == 24 * 24  # the CLS token is dropped
    count = count_image_tokens(counting_config("projection", markers=False), tokens)
    assert (count.placeholders, count.markers, count.llm_positions, count.cross_attention_kv) == (576, 0, 576, 0)
    assert count_image_tokens(counting_config("projection"), tokens).llm_positions == 578


def test_qformer_and_cross_attention_counts():
    assert count_image_tokens(counting_config("qformer", {"num_queries": 32}), 576).llm_positions == 34
    cross = count_image_tokens(counting_config("cross_attention", CrossAttentionConfig(), markers=False), 1025)
    assert (cross.llm_positions, cross.cross_attention_kv) == (1, 1025)
    resampled = CrossAttentionConfig(resampler=ResamplerConfig(num_latents=64))
    assert count_image_tokens(counting_config("cross_attention", resampled, markers=False), 576).cross_attention_kv == 64


