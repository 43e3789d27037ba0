"""Token accounting: how many LLM positions an image becomes. The one place this is computed.

The processor expands each image placeholder to exactly this many positions and the model checks the
placeholders it receives against the features it produced; five of HF's LLaVA-NeXT bugs came from those
two computing it separately.
"""

from __future__ import annotations

from dataclasses import dataclass

from kopru.config import KopruConfig
from kopru.connectors import strategy_class


@dataclass(frozen=True)
class ImageTokenCount:
    placeholders: int  # image-token positions in the text per image (1 for cross-attention)
    markers: int  # <image_start>/<image_end> positions around them
    cross_attention_kv: int  # key/value positions per image seen through cross-attention (0 when spliced)

    @property
    def llm_positions(self) -> int:
        """Positions one image occupies in the LLM's context window."""
        return self.placeholders + self.markers


def count_image_tokens(config: KopruConfig, vision_tokens: int) -> ImageTokenCount:
    """Positions per image for `config`, given the `vision_tokens` the vision tower hands to the connector."""
    connector = strategy_class(config.strategy)
    features = connector.output_tokens(config.connector, vision_tokens)
    markers = 2 if config.uses_markers else 0
    if connector.splices_into_text:
        return ImageTokenCount(placeholders=features, markers=markers, cross_attention_kv=0)
    return ImageTokenCount(placeholders=1, markers=markers, cross_attention_kv=features)
