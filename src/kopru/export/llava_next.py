"""Köprü `projection` with anyres resolution -> HF `LlavaNextForConditionalGeneration` (LLaVA-NeXT's layout).

The inverse of kopru.convert.llava_next: LLaVA's mapping (kopru.export.llava) with the grid pinpoints, the
learned newline and LLaVA-NeXT's image processor (its tiling is what Köprü's anyres preprocessing reproduces).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

from kopru.config import KopruConfig
from kopru.convert.llava_next import weight_names
from kopru.export import llava
from kopru.export.chat_template import exported_chat_template
from kopru.export.common import config_values, generation_config, hf_image_processor, hf_model, hf_state
from kopru.geometry import anyres_pinpoints
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor

if TYPE_CHECKING:
    from transformers import PretrainedConfig


HF_CLASS = LlavaNextForConditionalGeneration


def check(config: KopruConfig, encoder_config: PretrainedConfig, llm_config: PretrainedConfig) -> None:
    llava.check(config, encoder_config, llm_config, target="llava_next", mode="anyres")


def image_settings(model: KopruForConditionalGeneration, processor: KopruProcessor) -> dict:
    """LlavaNextImageProcessor's settings for Köprü's anyres pixels: tiles and the base view at the encoder's size,
    its pinpoints, the normalisation and resampling of the model's own image processor."""
    pinpoints = anyres_pinpoints(model.config.resolution, model.vision.image_size)
    base = dataclasses.replace(processor.image_processor, processor_type="LlavaNextImageProcessor", mode="resize",
                               size=model.vision.image_size, shortest_edge=None,
                               extra={**processor.image_processor.extra, "image_grid_pinpoints": pinpoints,
                                      "do_pad": True})
    return base.to_hf_settings()


def build(model: KopruForConditionalGeneration, processor: KopruProcessor
          ) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    config = LlavaNextConfig(
        vision_config=config_values(model.vision.encoder.config),
        text_config=config_values(model.llm.config),
        image_token_id=model.config.image_token_id,
        image_seq_length=model.vision.num_tokens,  # one view's positions, as LLaVA-NeXT's configs give it
        projector_hidden_act="gelu",
        vision_feature_select_strategy=llava.feature_select_strategy(model),
        vision_feature_layer=model.config.vision.feature_layer,
        image_grid_pinpoints=anyres_pinpoints(model.config.resolution, model.vision.image_size),
        multimodal_projector_bias=True,
    )
    hf = hf_model(HF_CLASS, config, hf_state(model, weight_names(model.llm)))
    hf.generation_config = generation_config(model, processor)
    template = exported_chat_template(processor)
    hf_processor = LlavaNextProcessor(image_processor=hf_image_processor(image_settings(model, processor)),
                                      tokenizer=llava.exported_tokenizer(processor, template), chat_template=template,
                                      **llava.processor_settings(model))
    return hf, hf_processor
