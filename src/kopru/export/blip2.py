"""Köprü `qformer` on a BLIP-2 vision tower -> HF `Blip2ForConditionalGeneration` (decoder-only LLM).

The inverse of kopru.convert.blip2 (the same weight tables read the other way). BLIP-2's processor puts the
`num_query_tokens` image positions in front of the whole prompt, bos included, and never where an image part
stands; so the exported chat template prints nothing for image parts, and markers around the image cannot be
expressed at all (there is no text before the query tokens to hold an `<image_start>`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

from kopru.config import KopruConfig
from kopru.convert.blip2 import hf_weights_from_kopru
from kopru.convert.common import kopru_weights
from kopru.export.chat_template import exported_chat_template
from kopru.export.common import (
    config_values,
    generation_config,
    hf_image_processor,
    hf_model,
    image_settings,
    refuse_unless,
)
from kopru.export.llava import exported_tokenizer
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor

if TYPE_CHECKING:
    from transformers import PretrainedConfig


HF_CLASS = Blip2ForConditionalGeneration
IMAGE_TOKEN = "<image>"  # the token Blip2Processor writes (unless the tokenizer names another)


def check(config: KopruConfig, encoder_config: PretrainedConfig, llm_config: PretrainedConfig) -> None:
    refuse_unless(config.strategy == "qformer", f"--to blip2 takes a qformer model; found strategy {config.strategy!r} "
                  "(a projection model fits --to llava or --to llava_next, a cross_attention one --to mllama)")
    refuse_unless(encoder_config.model_type == "blip_2_vision_model",
                  f"--to blip2 takes a qformer model on a BLIP-2 vision tower (blip_2_vision_model, as kopru convert "
                  f"--from blip2 gives); found a {encoder_config.model_type!r} tower, which HF BLIP-2 cannot hold")
    refuse_unless(config.resolution.mode == "fixed" and config.resolution.reduction == "none",
                  f"--to blip2 sees one native-size pass per image; found resolution mode {config.resolution.mode!r} "
                  f"with reduction {config.resolution.reduction!r} (mode 'fixed', no reduction fits)")
    vision = config.vision
    refuse_unless(vision.feature_layer == -1 and vision.final_norm and vision.drop_cls is False,
                  "--to blip2 feeds the Q-Former the encoder's last_hidden_state (feature_layer -1, final_norm "
                  f"True, CLS kept: drop_cls False); found feature_layer {vision.feature_layer!r}, final_norm "
                  f"{vision.final_norm}, drop_cls {vision.drop_cls}")
    refuse_unless(not config.uses_markers,
                  f"--to blip2 cannot express image markers ({config.image_start_token!r} / "
                  f"{config.image_end_token!r}): BLIP-2's processor puts the query tokens in front of the whole "
                  "prompt; a model without markers (image_start_token and image_end_token None) fits")
    refuse_unless(config.image_token == IMAGE_TOKEN, f"--to blip2 writes images as {IMAGE_TOKEN!r} (BLIP-2's "
                  f"processor); found the image token {config.image_token!r}")


def build(model: KopruForConditionalGeneration, processor: KopruProcessor
          ) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    qformer = model.config.connector
    config = Blip2Config(
        vision_config=config_values(model.vision.encoder.config),
        qformer_config={
            "hidden_size": qformer.hidden_size, "num_hidden_layers": qformer.num_layers,
            "num_attention_heads": qformer.num_heads, "intermediate_size": qformer.intermediate_size,
            "cross_attention_frequency": qformer.cross_attention_frequency,
            "layer_norm_eps": qformer.layer_norm_eps, "hidden_act": qformer.hidden_act,
        },
        text_config=config_values(model.llm.config),
        num_query_tokens=qformer.num_queries,
        image_token_index=model.config.image_token_id,
    )
    hf = hf_model(HF_CLASS, config, hf_weights_from_kopru(kopru_weights(model)))
    hf.generation_config = generation_config(model, processor)
    template = exported_chat_template(processor, images_in_text=False)
    hf_processor = Blip2Processor(image_processor=hf_image_processor(image_settings(processor.image_processor)),
                                  tokenizer=exported_tokenizer(processor, template), chat_template=template,
                                  num_query_tokens=qformer.num_queries)
    return hf, hf_processor
