"""HF `LlavaForConditionalGeneration` (LLaVA-1.5) -> Köprü `projection` strategy."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, PreTrainedModel

from kopru.config import KopruConfig, VisionTowerConfig
from kopru.connectors.projection import ProjectionConfig
from kopru.convert.common import (
    image_preprocessor,
    load_kopru_weights,
    load_tokenizer,
    output_embeddings_name,
    rename,
)
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor
from kopru.vision import VisionTower

REFERENCE_CLASS = LlavaForConditionalGeneration

# HF LLaVA's weights and a Köprü projection model's (kopru.convert.common.rename; read both ways). HF's projector
# is Linear-GELU-Linear, Köprü's MLP the same nn.Sequential (the GELU at index 1 holds no weights).
PROJECTOR_NAMES = (
    ("model.multi_modal_projector.linear_1.", "connector.layers.0."),
    ("model.multi_modal_projector.linear_2.", "connector.layers.2."),
)


def weight_names(llm: PreTrainedModel) -> list[tuple[str, str]]:
    """(HF name, Köprü name) prefixes of a LLaVA with this causal LM: HF keeps the LM's base model (an AutoModel)
    as `model.language_model` and its head as `lm_head`; the causal LM holds them under its own attribute names."""
    return [
        ("model.vision_tower.", "vision.encoder."),
        *PROJECTOR_NAMES,
        ("model.language_model.", f"llm.{llm.base_model_prefix}."),
        ("lm_head.", f"llm.{output_embeddings_name(llm)}."),
    ]


def to_kopru(reference: LlavaForConditionalGeneration, src: str) -> tuple[KopruForConditionalGeneration, KopruProcessor]:
    kopru_config = llava_kopru_config(reference.config, src)
    vision = VisionTower(reference.model.vision_tower, kopru_config.vision)
    llm = AutoModelForCausalLM.from_config(reference.config.text_config)
    model = KopruForConditionalGeneration(kopru_config, vision, llm)
    load_kopru_weights(model, rename(reference.state_dict(), weight_names(llm), to="kopru"))
    tokenizer = load_tokenizer(src, kopru_config)
    processor = KopruProcessor(tokenizer, image_preprocessor(src, vision), kopru_config, model.image_count)
    return model, processor


def llava_kopru_config(config, src: str, **extra) -> KopruConfig:
    """The Köprü config of a LLaVA (or LLaVA-NeXT) HF config: an mlp2x_gelu projector, no image markers."""
    if config.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(
            f"expected vision_feature_select_strategy 'default' or 'full', found {config.vision_feature_select_strategy!r}"
        )
    if config.projector_hidden_act != "gelu":
        raise ValueError(f"expected a GELU projector (mlp2x_gelu), found activation {config.projector_hidden_act!r}")
    return KopruConfig(
        vision=VisionTowerConfig(
            name_or_path=src,
            feature_layer=config.vision_feature_layer,
            # HF's "default" drops position 0 whatever the encoder; Köprü only drops a real CLS token (None: drop
            # exactly when there is one), so a SigLIP-based LLaVA keeps its first patch (a known bug in the wild).
            drop_cls=None if config.vision_feature_select_strategy == "default" else False,
        ),
        llm=src,
        strategy="projection",
        connector=ProjectionConfig(kind="mlp", depth=2),
        image_token="<image>",
        image_start_token=None,
        image_end_token=None,
        image_token_id=config.image_token_id,
        **extra,
    )


def random_inputs(reference: LlavaForConditionalGeneration, model: KopruForConditionalGeneration):
    """Two prompts, one image each, the image block in the middle of random text."""
    vision_config = reference.config.vision_config
    per_image = model.image_count.placeholders
    text_ids = torch.randint(0, min(reference.config.image_token_id, 1000), (2, 12))
    image = torch.full((2, per_image), reference.config.image_token_id)
    input_ids = torch.cat([text_ids[:, :5], image, text_ids[:, 5:]], dim=1)
    pixel_values = torch.randn(2, 3, vision_config.image_size, vision_config.image_size)
    inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": torch.ones_like(input_ids)}
    return inputs, inputs

