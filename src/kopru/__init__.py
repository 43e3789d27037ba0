"""Köprü: join a pretrained vision encoder to a pretrained causal LLM.

The public names below load on first use (PEP 562), so that `import kopru.data.turkish` or a `kopru compare`
worker process does not pay for transformers' modeling code (about 3.5 s here) before it needs a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kopru.config import KopruConfig, ResolutionConfig, VisionTowerConfig
    from kopru.connectors import available_strategies, strategy_class
    from kopru.connectors.cross_attention import CrossAttentionConfig
    from kopru.connectors.projection import ProjectionConfig
    from kopru.connectors.qformer import QFormerConfig
    from kopru.connectors.resampler import ResamplerConfig
    from kopru.geometry import ImageTokenCount, count_image_tokens, image_positions
    from kopru.model import KopruForConditionalGeneration
    from kopru.processing import KopruProcessor

# Public name -> the module that owns it.
_OWNERS = {
    "KopruConfig": "kopru.config",
    "ResolutionConfig": "kopru.config",
    "VisionTowerConfig": "kopru.config",
    "available_strategies": "kopru.connectors",
    "strategy_class": "kopru.connectors",
    "CrossAttentionConfig": "kopru.connectors.cross_attention",
    "ProjectionConfig": "kopru.connectors.projection",
    "QFormerConfig": "kopru.connectors.qformer",
    "ResamplerConfig": "kopru.connectors.resampler",
    "KopruForConditionalGeneration": "kopru.model",
    "KopruProcessor": "kopru.processing",
    "ImageTokenCount": "kopru.geometry",
    "count_image_tokens": "kopru.geometry",
    "image_positions": "kopru.geometry",
}

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


def __getattr__(name: str) -> Any:
    if name not in _OWNERS:
        raise AttributeError(f"module 'kopru' has no attribute {name!r}")
    value = getattr(importlib.import_module(_OWNERS[name]), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
