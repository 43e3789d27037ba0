"""Token accounting: how many LLM positions an image becomes. The one place this is computed.

The processor expands each image placeholder to exactly this many positions and the model checks the
placeholders it receives against the features it produced; five of HF's LLaVA-NeXT bugs came from those
two computing it separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kopru.connectors import strategy_class
from kopru.geometry.plan import ImagePlan, packs_anyres_grid, plan_image

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from kopru.config import KopruConfig


@dataclass(frozen=True)
class ImageTokenCount:
    placeholders: int  # image-token positions in the text per image (1 for cross-attention)
    markers: int  # <image_start>/<image_end> positions around them
    cross_attention_kv: int  # key/value positions per image seen through cross-attention (0 when spliced)

    @property
    def llm_positions(self) -> int:
        """Positions one image occupies in the LLM's context window."""
        return self.placeholders + self.markers

    @property
    def features(self) -> int:
        """Vectors the connector produces for this image: spliced positions or cross-attention keys/values."""
        return self.cross_attention_kv or self.placeholders


def count_image_tokens(config: KopruConfig, vision_tokens: int) -> ImageTokenCount:
    """Positions per image for `config`, given the `vision_tokens` the vision tower hands to the connector."""
    connector = strategy_class(config.strategy)
    return _count(config, connector.output_tokens(config.connector, vision_tokens))


def connector_tokens(config: KopruConfig, plan: ImagePlan) -> int:
    """Vectors the connector side produces for one image of `plan`."""
    if packs_anyres_grid(config):
        return plan.layout.tokens
    connector = strategy_class(config.strategy)
    return plan.passes * connector.output_tokens(config.connector, plan.tokens_per_pass)


def cached_cross_attention_kv(config: KopruConfig, plan: ImagePlan) -> int:
    """Key/value positions the cross-attention layers hold for one image of `plan` (0 when spliced into the text).

    Its counted features, except on Llama-3.2-Vision tiles with `rows_without_image = "attend_all"` (what
    `kopru convert --from mllama` sets): transformers keeps all `max_tiles` tiles of an image, padding tiles
    included, in `cross_attention_states`, because rows without an image attend to them, and so does Köprü.
    """
    connector = strategy_class(config.strategy)
    if connector.splices_into_text:
        return 0
    if config.resolution.mode == "tiled" and getattr(config.connector, "rows_without_image", "zero") == "attend_all":
        return plan.tiling.max_tiles * connector.output_tokens(config.connector, plan.tokens_per_pass)
    return connector_tokens(config, plan)


def image_positions(config: KopruConfig, encoder_config: PretrainedConfig, width: int, height: int) -> ImageTokenCount:
    """Positions of one `width` x `height` image under `config` (its resolution mode, reduction and strategy).

    `encoder_config` is the vision encoder's HF config (a composite CLIP/SigLIP/BLIP-2 config works too).
    """
    return _count(config, connector_tokens(config, plan_image(config, encoder_config, height, width)))


def _count(config: KopruConfig, features: int) -> ImageTokenCount:
    markers = 2 if config.uses_markers else 0
    if strategy_class(config.strategy).splices_into_text:
        return ImageTokenCount(placeholders=features, markers=markers, cross_attention_kv=0)
    return ImageTokenCount(placeholders=1, markers=markers, cross_attention_kv=features)
