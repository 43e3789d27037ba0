"""The one table of published architectures: `kopru explain` and `kopru budget` presets both come from it.

Each `Preset` holds a published model's configs (copied from its checkpoints' config.json files; nothing is
downloaded), its strategy and who builds it on the meta device (`architecture`: Köprü itself or an HF reference
family). `kopru explain` builds the model from it; `kopru budget` reads the LLM's cache geometry and the image
rule from the same configs (`kopru.budget.preset_model`), so both commands take the same names and agree on every
number (tests/test_budget.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import transformers
from transformers import AutoConfig, PretrainedConfig

from kopru.config import KopruConfig, VisionTowerConfig

# ------------------------------------------------------------------------------------------------------------
# Published configs, copied from the checkpoints' config.json files on the Hugging Face hub. Fields left out
# take the HF config class's default, which is the published value for each of them.

CLIP_L_336 = {  # openai/clip-vit-large-patch14-336 (vision side), as in llava-hf/llava-1.5-7b-hf
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
VICUNA_7B = {  # lmsys/vicuna-7b-v1.5 (Llama-2-7B) as in llava-hf/llava-1.5-7b-hf: 32064 rows (LLaVA pads 32000)
    "model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
VICUNA_13B = {  # lmsys/vicuna-13b-v1.5 (Llama-2-13B) as in llava-hf/llava-1.5-13b-hf
    **VICUNA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
    "num_attention_heads": 40, "num_key_value_heads": 40,
}
EVA_VIT_G = {  # Salesforce/blip2-opt-2.7b vision_config: EVA ViT-g/14 at 224 px, 39 layers
    "model_type": "blip_2_vision_model", "hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
    "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "qkv_bias": True, "layer_norm_eps": 1e-6,
}
BLIP2_QFORMER = {  # Salesforce/blip2-opt-2.7b qformer_config (BERT-base with cross-attention every 2nd layer)
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "cross_attention_frequency": 2, "vocab_size": 30522,
}
OPT_2_7B = {  # Salesforce/blip2-opt-2.7b text_config (facebook/opt-2.7b, 50304 rows with the image token)
    "model_type": "opt", "vocab_size": 50304, "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
    "num_attention_heads": 32, "word_embed_proj_dim": 2560, "max_position_embeddings": 2048,
}
VICUNA_7B_V11 = {**VICUNA_7B, "vocab_size": 32000, "max_position_embeddings": 2048}  # lmsys/vicuna-7b-v1.1
MLLAMA_VISION = {  # meta-llama/Llama-3.2-11B-Vision (and 90B) vision_config
    "model_type": "mllama_vision_model", "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_global_layers": 8, "attention_heads": 16, "image_size": 560, "patch_size": 14, "max_num_tiles": 4,
    "intermediate_layers_indices": [3, 7, 15, 23, 30], "vision_output_dim": 7680, "norm_eps": 1e-5,
    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
}
_LLAMA_31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
MLLAMA_11B_TEXT = {  # meta-llama/Llama-3.2-11B-Vision text_config: Llama-3.1-8B + 8 cross-attention layers
    "model_type": "mllama_text_model", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
    "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_parameters": _LLAMA_31_ROPE,
}
MLLAMA_90B_TEXT = {  # meta-llama/Llama-3.2-90B-Vision text_config: Llama-3.1-70B + 20 cross-attention layers
    **MLLAMA_11B_TEXT, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 100,
    "num_attention_heads": 64, "cross_attention_layers": list(range(3, 100, 5)),
}
QWEN2_VL_7B_VISION = {  # Qwen/Qwen2-VL-7B-Instruct vision_config
    "model_type": "qwen2_vl_vision", "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
    "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
}
QWEN2_VL_7B_TEXT = {  # Qwen/Qwen2-VL-7B-Instruct text side
    "model_type": "qwen2_vl_text", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}


@dataclass(frozen=True)
class Preset:
    """One model to explain: the configs, the strategy, and how it is built on the meta device."""

    name: str
    description: str
    source: str  # the published checkpoint(s) the configs are copied from
    architecture: str  # key of ARCHITECTURES: who builds the meta model ("kopru" or an HF reference family)
    strategy: str
    vision: dict[str, Any]
    text: dict[str, Any]
    # Köprü model fields (architecture "kopru"): VisionTowerConfig fields, connector config, image markers.
    vision_tower: dict[str, Any] = field(default_factory=dict)
    connector: dict[str, Any] | None = None
    markers: bool = False
    # The HF reference class that the parameter counts are checked against, and its composite-config extras.
    reference: str | None = None
    reference_extra: dict[str, Any] = field(default_factory=dict)
    default_image: tuple[int, int] | None = None  # (width, height); None: the encoder's image_size square

    def kopru_config(self) -> KopruConfig | None:
        """The Köprü config of an architecture Köprü builds itself (`architecture == "kopru"`); None otherwise."""
        if self.architecture != "kopru":
            return None
        return KopruConfig(
            vision=VisionTowerConfig(self.source, **self.vision_tower), llm=self.source, strategy=self.strategy,
            connector=self.connector, image_start_token="<image_start>" if self.markers else None,
            image_end_token="<image_end>" if self.markers else None,
        )


_LLAVA_TOWER = {"feature_layer": -2}
_BLIP2_TOWER = {"feature_layer": -1, "drop_cls": False, "final_norm": True}
_BLIP2_QFORMER_CONNECTOR = {"num_queries": 32, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                            "intermediate_size": 3072, "cross_attention_frequency": 2}
_LLAVA_EXTRA = {"image_token_index": 32000, "vision_feature_layer": -2, "projector_hidden_act": "gelu"}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("llava-1.5-7b", "LLaVA-1.5-7B: CLIP ViT-L/14-336 -> 2-layer GELU MLP -> Vicuna-7B",
           "llava-hf/llava-1.5-7b-hf", "kopru", "projection", CLIP_L_336, VICUNA_7B, _LLAVA_TOWER,
           {"kind": "mlp", "depth": 2}, reference="LlavaForConditionalGeneration", reference_extra=_LLAVA_EXTRA),
    Preset("llava-1.5-13b", "LLaVA-1.5-13B: CLIP ViT-L/14-336 -> 2-layer GELU MLP -> Vicuna-13B",
           "llava-hf/llava-1.5-13b-hf", "kopru", "projection", CLIP_L_336, VICUNA_13B, _LLAVA_TOWER,
           {"kind": "mlp", "depth": 2}, reference="LlavaForConditionalGeneration", reference_extra=_LLAVA_EXTRA),
    Preset("llava-next-7b", "LLaVA-NeXT (1.6) 7B: LLaVA-1.5-7B's parts, anyres tiling + a learned row newline",
           "llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next", "projection", CLIP_L_336, VICUNA_7B,
           reference="LlavaNextForConditionalGeneration", reference_extra=_LLAVA_EXTRA),
    Preset("blip-2-opt-2.7b", "BLIP-2: EVA ViT-g/14 -> Q-Former (32 queries) -> OPT-2.7B",
           "Salesforce/blip2-opt-2.7b", "kopru", "qformer", EVA_VIT_G, OPT_2_7B, _BLIP2_TOWER,
           _BLIP2_QFORMER_CONNECTOR, reference="Blip2ForConditionalGeneration",
           reference_extra={"qformer_config": BLIP2_QFORMER, "num_query_tokens": 32, "image_token_index": 50265}),
    Preset("blip-2-vicuna-7b", "BLIP-2's EVA ViT-g/14 + Q-Former (32 queries) with Vicuna-7B v1.1 as the LLM "
           "(LAVIS blip2_vicuna / InstructBLIP-Vicuna-7B pairing, without InstructBLIP's text input to the "
           "Q-Former)", "Salesforce/blip2-opt-2.7b (vision, Q-Former) + lmsys/vicuna-7b-v1.1", "kopru", "qformer",
           EVA_VIT_G, VICUNA_7B_V11, _BLIP2_TOWER, _BLIP2_QFORMER_CONNECTOR,
           reference="Blip2ForConditionalGeneration",
           reference_extra={"qformer_config": BLIP2_QFORMER, "num_query_tokens": 32}),
    Preset("llama-3.2-11b-vision", "Llama-3.2-11B-Vision: tiled ViT-H/14 (7680-wide features) -> Linear -> "
           "cross-attention layers inside Llama-3.1-8B", "meta-llama/Llama-3.2-11B-Vision", "mllama",
           "cross_attention", MLLAMA_VISION, MLLAMA_11B_TEXT, reference="MllamaForConditionalGeneration"),
    Preset("llama-3.2-90b-vision", "Llama-3.2-90B-Vision: the 11B's encoder -> Linear -> cross-attention layers "
           "inside Llama-3.1-70B", "meta-llama/Llama-3.2-90B-Vision", "mllama", "cross_attention", MLLAMA_VISION,
           MLLAMA_90B_TEXT, reference="MllamaForConditionalGeneration"),
    Preset("qwen2-vl-7b", "Qwen2-VL-7B: native-resolution ViT (675M) -> 2x2 patch merger MLP -> Qwen2-7B",
           "Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", "projection", QWEN2_VL_7B_VISION, QWEN2_VL_7B_TEXT,
           reference="Qwen2VLForConditionalGeneration", default_image=(336, 336)),
    # The lesson's three strategies over the same encoder and LLM (CLIP-L/336 + Vicuna-7B), Köprü's defaults.
    Preset("projection-clip-l-vicuna-7b", "strategy 1 as the lesson writes it: CLIP-L/336 -> one Linear "
           "1024->4096 -> Vicuna-7B, <image_start>/<image_end> around the 576 image tokens",
           "llava-hf/llava-1.5-7b-hf (backbones)", "kopru", "projection", CLIP_L_336, VICUNA_7B, _LLAVA_TOWER,
           {"kind": "linear"}, markers=True),
    Preset("qformer-clip-l-vicuna-7b", "strategy 2: CLIP-L/336 -> BLIP-2-sized Q-Former (32 queries, 12 layers, "
           "width 768) -> Linear -> Vicuna-7B", "llava-hf/llava-1.5-7b-hf (backbones)", "kopru", "qformer",
           CLIP_L_336, VICUNA_7B, _LLAVA_TOWER, _BLIP2_QFORMER_CONNECTOR, markers=True),
    Preset("cross-attention-clip-l-vicuna-7b", "strategy 3: CLIP-L/336 -> Linear -> tanh-gated cross-attention "
           "blocks before every 4th layer of a frozen Vicuna-7B", "llava-hf/llava-1.5-7b-hf (backbones)", "kopru",
           "cross_attention", CLIP_L_336, VICUNA_7B, _LLAVA_TOWER, {"every_n_layers": 4}, markers=True),
]}


def hf_config(fields: dict[str, Any]) -> PretrainedConfig:
    """An HF config from a dict holding its `model_type`."""
    fields = dict(fields)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def reference_config(preset: Preset) -> PretrainedConfig:
    """The composite HF config of `preset`'s reference class (LlavaConfig, Blip2Config, ...)."""
    if preset.reference is None:
        raise ValueError(f"preset {preset.name!r} has no HF reference model")
    config_class = getattr(transformers, preset.reference.replace("ForConditionalGeneration", "Config"))
    # LLaVA's sub-configs are AutoConfigs chosen by model_type; the others have fixed sub-config classes
    # (Blip2VisionConfig, MllamaTextConfig, ...) that take the fields alone. BLIP-2's text side is an AutoConfig.
    vision = {k: v for k, v in preset.vision.items() if k != "model_type" or preset.reference.startswith("Llava")}
    text = {k: v for k, v in preset.text.items() if not (k == "model_type" and v.endswith("_text_model"))}
    extra = dict(preset.reference_extra)
    if preset.reference.startswith("Qwen2VL"):
        text = dict(preset.text)
        extra.setdefault("tie_word_embeddings", preset.text.get("tie_word_embeddings", False))
    return config_class(vision_config=vision, text_config=text, **extra)


def preset_names() -> list[str]:
    """Every preset's name, sorted: the `--preset` choices of both `kopru explain` and `kopru budget`."""
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called `name`; an error listing every name otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {preset_names()}") from None
