"""The three connection strategies, chosen by name through one registry."""

from kopru.connectors.base import Connector, available_strategies, register_strategy, strategy_class
from kopru.connectors.cross_attention import CrossAttentionConfig, CrossAttentionConnector
from kopru.connectors.projection import ProjectionConfig, ProjectionConnector
from kopru.connectors.qformer import QFormerConfig, QFormerConnector

__all__ = [
    "Connector",
    "CrossAttentionConfig",
    "CrossAttentionConnector",
    "ProjectionConfig",
    "ProjectionConnector",
    "QFormerConfig",
    "QFormerConnector",
    "available_strategies",
    "register_strategy",
    "strategy_class",
]
