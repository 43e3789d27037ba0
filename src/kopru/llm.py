"""The language side: any `AutoModelForCausalLM`, and the few structural facts Köprü needs from it."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kopru.paths import check_exists


def load_llm(name_or_path: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM from a local directory or hub id, safetensors only."""
    check_exists(name_or_path, "LLM")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        raise FileNotFoundError(f"expected a Hugging Face causal LM (config.json) at {name_or_path!r}: {error}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"expected a causal LM checkpoint at {name_or_path!r}, found model_type {config.model_type!r} "
            "which AutoModelForCausalLM cannot load"
        )
    return AutoModelForCausalLM.from_pretrained(name_or_path, use_safetensors=True, dtype=dtype)


def decoder_layers(llm: PreTrainedModel) -> nn.ModuleList:
    """The LLM's stack of decoder layers, found structurally (Llama `model.layers`, GPT-2 `transformer.h`, ...)."""
    count = llm.config.num_hidden_layers
    for module in llm.base_model.modules():  # the first such list, at any depth (OPT: model.decoder.layers)
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(
        f"could not find a list of {count} decoder layers in {type(llm).__name__}; "
        "expected an nn.ModuleList of that length inside its base model"
    )


def cache_argument(llm: PreTrainedModel) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever this install declares."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


# Where the context window is declared: Llama / Qwen2 / Mistral / OPT; GPT-2 (n_positions); others.
_WINDOW_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_window(config) -> int | None:
    """The LLM's maximum positions as its config declares them (a composite VLM config: its text config);
    None when it declares none."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _WINDOW_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def attention_geometry(config) -> tuple[int, int]:
    """(key/value heads, head dim) of the LLM's self-attention: grouped-query heads when it has them."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def kv_cache_bytes(positions: int, layers: int, kv_heads: int, head_dim: int, bytes_per_element: float,
                   batch: int = 1) -> float:
    """Bytes of the keys and values `layers` attention layers cache for `positions` positions per sequence."""
    return 2 * positions * layers * kv_heads * head_dim * bytes_per_element * batch
