"""Parameters: models built on the meta device (Köprü's own, or an HF reference class), split into named
components, with what trains in each recipe (`kopru.training.recipes` applied to the model, or to a tiny one of the same
strategy for reference models) and what LoRA adds."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from kopru.config import KopruConfig, VisionTowerConfig
from kopru.explain.report import RECIPES, Component
from kopru.llm import decoder_layers
from kopru.model import KopruForConditionalGeneration
from kopru.presets import Preset, hf_config, reference_config
from kopru.training.recipes import LoraSettings, apply_recipe
from kopru.vision import VISION_BACKBONES, VisionTower


def build_reference(preset: Preset) -> nn.Module:
    """`preset`'s HF reference model on the meta device (no storage, no download)."""
    model_class = getattr(transformers, preset.reference)
    with torch.device("meta"):
        return model_class(reference_config(preset))




def _config_value(config: PretrainedConfig, name: str, purpose: str, *fallbacks: str) -> Any:
    """A config field a figure needs; a clear error naming it when the config lacks it."""
    for key in (name, *fallbacks):
        value = getattr(config, key, None)
        if value is not None:
            return value
    names = " or ".join(repr(k) for k in (name, *fallbacks))
    raise ValueError(f"the {config.model_type!r} config has no {names} field, which {purpose} needs")


def _vision_encoder_class(vision_config: PretrainedConfig):
    if vision_config.model_type not in VISION_BACKBONES:
        raise ValueError(f"expected a vision encoder of type {sorted(VISION_BACKBONES)}, found "
                         f"{vision_config.model_type!r}")
    backbone = VISION_BACKBONES[vision_config.model_type]
    return functools.partial(backbone.load_class(), **dict(backbone.load_kwargs))


def build_kopru_meta(config: KopruConfig, vision_config: PretrainedConfig, llm_config: PretrainedConfig):
    """A KopruForConditionalGeneration on the meta device from the encoder's and the LLM's configs."""
    if config.image_token_id is None:  # no tokenizer here: any id names the placeholder (only shapes matter)
        vocab = llm_config.vocab_size
        config = dataclasses.replace(config, image_token_id=vocab - 1,
                                     image_start_token_id=vocab - 2 if config.uses_markers else None,
                                     image_end_token_id=vocab - 3 if config.uses_markers else None)
    for name in ("image_size", "patch_size"):
        _config_value(vision_config, name, "the vision token count")
    with torch.device("meta"):
        encoder = _vision_encoder_class(vision_config)(vision_config)
        llm = AutoModelForCausalLM.from_config(llm_config)
        return KopruForConditionalGeneration(config, VisionTower(encoder, config.vision), llm)


def partition(model: nn.Module, groups: Iterable[tuple[str, str, Iterable[nn.Parameter]]]
               ) -> list[tuple[str, str, list[nn.Parameter]]]:
    """Each parameter in the first group that holds it; groups left empty (a tied head) are dropped."""
    seen: set[int] = set()
    result = []
    for name, role, params in groups:
        mine = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in mine)
        if mine:
            result.append((name, role, mine))
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        raise RuntimeError(f"{sum(p.numel() for p in rest)} parameters fall in no component")
    return result


def params_of(module: nn.Module | None) -> list[nn.Parameter]:
    return [] if module is None else list(module.parameters())


def linear_shape(layer: nn.Linear) -> str:
    return f"{layer.in_features}->{layer.out_features}"


def _projection_groups(connector) -> list[tuple[str, str, list[nn.Parameter]]]:
    linears = [m for m in connector.modules() if isinstance(m, nn.Linear)]
    text = ", GELU, ".join(f"Linear {linear_shape(m)}" for m in linears)
    return [(f"projector ({text})", "connector", params_of(connector))]


def _qformer_groups(connector) -> list[tuple[str, str, list[nn.Parameter]]]:
    config = connector.qformer.config
    return [
        (f"Q-Former ({config.num_queries} queries x {config.hidden_size}, {config.num_layers} layers, "
         f"cross-attention every {config.cross_attention_frequency})", "connector", params_of(connector.qformer)),
        (f"Q-Former -> LLM (Linear {linear_shape(connector.projection)})", "connector",
         params_of(connector.projection)),
    ]


def _cross_attention_groups(connector) -> list[tuple[str, str, list[nn.Parameter]]]:
    groups = []
    if connector.resampler is not None:
        groups.append((f"Perceiver resampler ({len(connector.resampler.layers)} layers, "
                       f"{connector.resampler.latents.shape[0]} latents)", "connector", params_of(connector.resampler)))
    groups.append((f"image projection (Linear {linear_shape(connector.projection)})", "connector",
                   params_of(connector.projection)))
    groups.append((f"gated cross-attention blocks x{len(connector.blocks)} (before layers {connector.positions})",
                   "connector", params_of(connector.blocks)))
    return groups


# How each strategy's connector splits into named components (a strategy missing here is one component).
CONNECTOR_COMPONENTS: dict[str, Callable[[nn.Module], list[tuple[str, str, list[nn.Parameter]]]]] = {
    "projection": _projection_groups,
    "qformer": _qformer_groups,
    "cross_attention": _cross_attention_groups,
}


def connector_groups(model) -> list[tuple[str, str, list[nn.Parameter]]]:
    describe = CONNECTOR_COMPONENTS.get(model.config.strategy)
    if describe is None:
        return [(f"connector ({model.config.strategy})", "connector", params_of(model.connector))]
    return describe(model.connector)


def llm_groups(llm: nn.Module, prefix: str = "LLM") -> list[tuple[str, str, list[nn.Parameter]]]:
    layers = decoder_layers(llm)
    return [
        (f"{prefix} input embeddings", "llm", params_of(llm.get_input_embeddings())),
        (f"{prefix} decoder layers x{len(layers)}", "llm", params_of(layers)),
        (f"{prefix} output head", "llm", params_of(llm.get_output_embeddings())),
        (f"{prefix} final norm / positions", "llm", params_of(llm)),
    ]


def recipe_trainable(model, lora_rank: int) -> tuple[dict[str, dict[int, bool]], int | None]:
    """Per recipe, which parameters train (by id), applying `kopru.training.recipes.apply_recipe` to the meta model;
    and the LoRA adapters' parameter count (None where the strategy refuses LoRA)."""
    trains: dict[str, dict[int, bool]] = {}
    for recipe in ("align", "instruct", "single-stage"):
        apply_recipe(model, recipe)
        trains[recipe] = {id(p): p.requires_grad for p in model.parameters()}
    if not model.connector.splices_into_text:
        return trains, None
    with torch.device("meta"), warnings.catch_warnings():  # peft's call of a deprecated transformers helper
        warnings.simplefilter("ignore", FutureWarning)
        apply_recipe(model, "instruct", LoraSettings(r=lora_rank, alpha=2 * lora_rank, dropout=0.0))
    trains["lora"] = {id(p): p.requires_grad for p in model.parameters()}
    adapters = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    model.llm = model.llm.unload()  # peft injects the adapters in place: take them out again
    model.requires_grad_(False)
    return trains, adapters


@functools.cache
def roles_trained(strategy: str) -> dict[str, frozenset[str]]:
    """For a strategy, the roles (vision / connector / llm) each recipe trains: `kopru.training.recipes` applied to a tiny
    meta Köprü model of that strategy, so reference presets follow exactly the rules Köprü models do."""
    vision = hf_config({"model_type": "clip_vision_model", "hidden_size": 8, "intermediate_size": 16,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 8, "patch_size": 4})
    llm = hf_config({"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
                     "num_hidden_layers": 4, "num_attention_heads": 2})
    connector = {"qformer": {"num_queries": 2, "hidden_size": 8, "num_layers": 1, "num_heads": 2,
                             "intermediate_size": 16}}.get(strategy)
    model = build_kopru_meta(KopruConfig(VisionTowerConfig("tiny"), "tiny", strategy, connector), vision, llm)
    trains, _ = recipe_trainable(model, lora_rank=2)
    parts = {"vision": model.vision, "connector": model.connector, "llm": model.llm}
    # The base parameters only: with LoRA, the adapters are counted apart (see lora_params).
    return {recipe: frozenset(role for role, module in parts.items()
                              if any(trains[recipe][id(p)] for p in module.parameters()))
            for recipe in trains}


def lora_params(modules: Iterable[nn.Module], exclude: set[int], rank: int) -> int:
    """Parameters LoRA adds to every nn.Linear (peft's "all-linear": all but the output head): r x (in + out)."""
    return sum(rank * (m.in_features + m.out_features) for module in modules for m in module.modules()
               if isinstance(m, nn.Linear) and id(m) not in exclude)


def components_of(groups, trains: dict[str, dict[int, bool]] | None, roles: dict[str, frozenset[str]] | None,
                lora_adapters: int | None, lora_rank: int) -> list[Component]:
    components = []
    for name, role, params in groups:
        trainable: dict[str, int | None] = {}
        for recipe in RECIPES:
            if recipe == "lora" and lora_adapters is None:
                trainable[recipe] = None
            elif trains is not None:
                trainable[recipe] = sum(p.numel() for p in params if trains[recipe][id(p)])
            else:
                trainable[recipe] = sum(p.numel() for p in params) if role in roles[recipe] else 0
        components.append(Component(name, role, sum(p.numel() for p in params), trainable))
    if lora_adapters is not None:
        trainable = {recipe: 0 for recipe in RECIPES} | {"lora": lora_adapters}
        components.append(Component(f"LoRA adapters (r={lora_rank}, every LLM Linear but the head; lora only)",
                                    "adapter", lora_adapters, trainable))
    return components
