"""Köprü `projection` at fixed resolution -> HF `LlavaForConditionalGeneration` (LLaVA-1.5's layout).

The inverse of kopru.convert.llava: the same weight-name table read the other way, the feature layer(s) as
`vision_feature_layer`, the CLS rule as `vision_feature_select_strategy` ("default" drops position 0, which
Köprü does exactly when the encoder has a CLS token; "full" keeps every position), the image markers, if the
model has them, printed by the chat template around the image token (kopru.export.chat_template).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from kopru.config import KopruConfig
from kopru.convert.llava import weight_names
from kopru.export.chat_template import exported_chat_template
from kopru.export.common import (
    config_values,
    generation_config,
    hf_image_processor,
    hf_model,
    hf_state,
    image_settings,
    refuse_unless,
)
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor
from kopru.vision import VISION_BACKBONES

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


HF_CLASS = LlavaForConditionalGeneration
# Encoders HF's LLaVA runs as its vision tower (AutoModel of the vision config, hidden states by index).
ENCODERS = ("clip_vision_model", "siglip_vision_model")
OTHER_TARGETS = {"qformer": "--to blip2 takes a qformer model on a BLIP-2 vision tower",
                 "cross_attention": "--to mllama takes a cross_attention model on an Mllama vision tower"}


def check(config: KopruConfig, encoder_config: PretrainedConfig, llm_config: PretrainedConfig, target: str = "llava",
          mode: str = "fixed") -> None:
    """What HF LLaVA (and LLaVA-NeXT, `mode="anyres"`) cannot express, refused with what would fit."""
    refuse_unless(config.strategy == "projection", f"--to {target} takes a projection model; found strategy "
                  f"{config.strategy!r} ({OTHER_TARGETS.get(config.strategy, '')})")
    found = config.resolution.mode
    fits = {"fixed": "--to llava", "anyres": "--to llava_next"}
    refuse_unless(found == mode, f"--to {target} takes resolution mode {mode!r}; found {found!r} ("
                  + (f"{fits[found]} takes it" if found in fits else "no HF checkpoint class here reproduces it: "
                     "Qwen2-VL's dynamic resolution and Mllama's tiles have no LLaVA counterpart") + ")")
    refuse_unless(config.resolution.reduction == "none",
                  f"--to {target} feeds every patch to the projector; found a {config.resolution.reduction} "
                  f"reduction of {config.resolution.reduction_factor}x{config.resolution.reduction_factor} patches "
                  "before it, which HF LLaVA cannot express (a model trained without a reduction fits)")
    connector = config.connector
    depth = 1 if connector.kind == "linear" else connector.depth
    refuse_unless(depth == 2, f"--to {target} has LLaVA-1.5's projector, Linear-GELU-Linear (kind 'mlp', depth 2); "
                  f"found {'a linear projector' if connector.kind == 'linear' else f'an MLP of depth {depth}'}, "
                  "which HF LLaVA cannot express (train with --connector '{\"kind\": \"mlp\", \"depth\": 2}')")
    refuse_unless(encoder_config.model_type in ENCODERS,
                  f"--to {target} runs a vision tower of type {list(ENCODERS)}; found {encoder_config.model_type!r}")
    refuse_unless(not config.vision.final_norm, f"--to {target} reads the encoder's hidden states as they are; "
                  "found final_norm=True (the final LayerNorm applied), which HF LLaVA cannot express")


def feature_select_strategy(model: KopruForConditionalGeneration) -> str:
    """HF's "default" drops position 0; Köprü drops exactly a real CLS token (VisionTower.drop_cls)."""
    return "default" if model.vision.drop_cls else "full"


def processor_settings(model: KopruForConditionalGeneration) -> dict:
    """What HF's LLaVA processors need to count each image's positions as Köprü does."""
    has_cls = VISION_BACKBONES[model.vision.encoder.config.model_type].has_cls
    return {"patch_size": model.vision.patch_size, "vision_feature_select_strategy": feature_select_strategy(model),
            "image_token": model.config.image_token, "num_additional_image_tokens": int(has_cls)}


def exported_tokenizer(processor: KopruProcessor, template: str) -> PreTrainedTokenizerBase:
    tokenizer = copy.deepcopy(processor.tokenizer)  # Köprü's own processor stays as it is (verify runs it)
    tokenizer.chat_template = template
    return tokenizer


def build(model: KopruForConditionalGeneration, processor: KopruProcessor
          ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    config = LlavaConfig(
        vision_config=config_values(model.vision.encoder.config),
        text_config=config_values(model.llm.config),
        image_token_id=model.config.image_token_id,
        image_seq_length=model.vision.num_tokens,
        projector_hidden_act="gelu",  # nn.GELU(), the exact erf GELU
        vision_feature_select_strategy=feature_select_strategy(model),
        vision_feature_layer=model.config.vision.feature_layer,
        multimodal_projector_bias=True,
    )
    hf = hf_model(HF_CLASS, config, hf_state(model, weight_names(model.llm)))
    hf.generation_config = generation_config(model, processor)
    template = exported_chat_template(processor)
    hf_processor = LlavaProcessor(image_processor=hf_image_processor(image_settings(processor.image_processor)),
                                  tokenizer=exported_tokenizer(processor, template), chat_template=template,
                                  **processor_settings(model))
    return hf, hf_processor
