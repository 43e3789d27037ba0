"""Köprü: join a pretrained vision encoder to a pretrained causal LLM."""

from kopru.config import KopruConfig, ResolutionConfig, VisionTowerConfig
from kopru.connectors import available_strategies, strategy_class
from kopru.connectors.cross_attention import CrossAttentionConfig
from kopru.connectors.projection import ProjectionConfig
from kopru.connectors.qformer import QFormerConfig
from kopru.connectors.resampler import ResamplerConfig
from kopru.geometry import ImageTokenCount, count_image_tokens, image_positions
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor

__all__ = [
    "CrossAttentionConfig",
    "ImageTokenCount",
    "KopruConfig",
    "KopruForConditionalGeneration",
    "KopruProcessor",
    "ProjectionConfig",
    "QFormerConfig",
    "ResamplerConfig",
    "ResolutionConfig",
    "VisionTowerConfig",
    "available_strategies",
    "count_image_tokens",
    "image_positions",
    "strategy_class",
]
