"""Köprü `cross_attention` on an Mllama vision tower with a Llama LLM -> HF `MllamaForConditionalGeneration`.

The inverse of kopru.convert.mllama: each gated block goes back in as a cross-attention decoder layer in front
of the self-attention layer it precedes (blocks before self-attention layers [3, 7, 11, ...] become
cross-attention layers [3, 8, 13, ...]), through the same weight-name table; the head loses the 8 zero rows the
conversion gave it (`unpad_lm_head`). What transformers' Mllama computes fixes the rest: its image tiles
(resolution mode "tiled"), no resampler, gated blocks shaped as the LLM's layers, rows before the first image
attending to every tile (rows_without_image "attend_all").
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor

from kopru.config import KopruConfig
from kopru.convert.common import kopru_weights, rename
from kopru.convert.mllama import IMAGE_TOKEN, text_config, unpad_lm_head, weight_names
from kopru.export.chat_template import exported_chat_template
from kopru.export.common import config_values, generation_config, hf_image_processor, hf_model, refuse_unless
from kopru.export.llava import exported_tokenizer
from kopru.geometry import max_tiles
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor

if TYPE_CHECKING:
    from transformers import PretrainedConfig


HF_CLASS = MllamaForConditionalGeneration


def check(config: KopruConfig, encoder_config: PretrainedConfig, llm_config: PretrainedConfig) -> None:
    refuse_unless(config.strategy == "cross_attention", f"--to mllama takes a cross_attention model; found strategy "
                  f"{config.strategy!r} (a projection model fits --to llava or --to llava_next, a qformer one "
                  "--to blip2)")
    refuse_unless(encoder_config.model_type == "mllama_vision_model",
                  f"--to mllama takes an Mllama vision tower (mllama_vision_model, as kopru convert --from mllama "
                  f"gives); found {encoder_config.model_type!r}, which HF Mllama cannot hold")
    refuse_unless(config.resolution.mode == "tiled" and config.resolution.reduction == "none",
                  f"--to mllama tiles every image as HF's MllamaImageProcessor does (resolution mode 'tiled', no "
                  f"reduction); found mode {config.resolution.mode!r} with reduction {config.resolution.reduction!r}")
    vision = config.vision
    refuse_unless(vision.feature_layer == -1 and vision.drop_cls is False and not vision.final_norm,
                  "--to mllama takes the tower's output as Mllama's projector reads it (feature_layer -1, CLS kept: "
                  f"drop_cls False, no final_norm); found feature_layer {vision.feature_layer!r}, drop_cls "
                  f"{vision.drop_cls}, final_norm {vision.final_norm}")
    refuse_unless(llm_config.model_type == "llama", f"--to mllama takes a Llama LLM (Mllama's text model is Llama's "
                  f"layers); found {llm_config.model_type!r}")
    shape = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
             "head_dim": llm_config.hidden_size // llm_config.num_attention_heads}
    differs = {k: getattr(llm_config, k, None) for k, v in shape.items() if getattr(llm_config, k, None) != v}
    refuse_unless(not differs, f"--to mllama takes a Llama shaped as Mllama's text layers {shape}; found {differs}")
    connector = config.connector
    refuse_unless(connector.resampler is None, "--to mllama has no Perceiver resampler (Mllama's projector is one "
                  "linear layer); found a resampler with "
                  f"{getattr(connector.resampler, 'num_latents', '?')} latents (a model without one fits)")
    blocks = {"num_heads": (connector.num_heads, llm_config.num_attention_heads),
              "num_kv_heads": (connector.num_kv_heads, llm_config.num_key_value_heads),
              "intermediate_size": (connector.intermediate_size, llm_config.intermediate_size),
              "qk_norm": (connector.qk_norm, True), "attend_to": (connector.attend_to, "previous"),
              "rows_without_image": (connector.rows_without_image, "attend_all")}
    differs = {k: found for k, (found, expected) in blocks.items() if found is not None and found != expected}
    refuse_unless(not differs, "--to mllama takes gated blocks shaped and attending as Mllama's cross-attention layers "
                  f"({ {k: expected for k, (_, expected) in blocks.items()} }); found {differs}"
                  + (" (rows_without_image 'zero' is Meta's reference; transformers gives rows before the first image "
                     "attention over every tile)" if "rows_without_image" in differs else ""))
    refuse_unless(config.image_token == IMAGE_TOKEN, f"--to mllama writes images as {IMAGE_TOKEN!r} (Mllama's "
                  f"processor); found the image token {config.image_token!r}")


def image_settings(model: KopruForConditionalGeneration, processor: KopruProcessor) -> dict:
    """MllamaImageProcessor's settings for Köprü's tiles: the tile size and count of the encoder, the
    normalisation and resampling of the model's own image processor."""
    base = dataclasses.replace(processor.image_processor, processor_type="MllamaImageProcessor", mode="resize",
                               size=model.vision.image_size, shortest_edge=None,
                               extra={**processor.image_processor.extra,
                                      "max_image_tiles": max_tiles(model.vision.encoder.config), "do_pad": True})
    return base.to_hf_settings()


def build(model: KopruForConditionalGeneration, processor: KopruProcessor
          ) -> tuple[MllamaForConditionalGeneration, MllamaProcessor]:
    positions = model.connector.positions
    cross = [position + block for block, position in enumerate(positions)]  # each block's layer in Mllama
    num_layers = model.llm.config.num_hidden_layers + len(cross)
    state = kopru_weights(model)
    head, embeddings = unpad_lm_head(state["llm.lm_head.weight"], state["llm.model.embed_tokens.weight"])
    state.update({"llm.lm_head.weight": head, "llm.model.embed_tokens.weight": embeddings})
    config = MllamaConfig(
        vision_config=config_values(model.vision.encoder.config),
        text_config=text_config(model.llm.config, cross, vocab_size=head.shape[0]),
        image_token_index=model.config.image_token_id,
    )
    hf = hf_model(HF_CLASS, config, rename(state, weight_names(cross, num_layers), to="hf"))
    hf.generation_config = generation_config(model, processor)
    template = exported_chat_template(processor)
    hf_processor = MllamaProcessor(image_processor=hf_image_processor(image_settings(model, processor)),
                                   tokenizer=exported_tokenizer(processor, template), chat_template=template)
    return hf, hf_processor
