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
