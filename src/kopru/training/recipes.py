"""Training recipes: what trains in each stage, with which learning rate (Prismatic-style explicit freezing).

- `align` (LLaVA stage 1): encoder and LLM frozen, the connector trains, plain caption template.
- `instruct` (LLaVA stage 2): connector + LLM, fully or with LoRA adapters through `peft`.
- `single-stage` (Prismatic): `instruct` straight from the backbones, skipping `align`.
- `qformer-stage1` (BLIP-2 stage 1): the Q-Former alone learns from captions with ITC / ITG / ITM
  (kopru.training.qformer_stage1), before `align` or `instruct`.
`cross_attention` keeps its base LLM frozen in every recipe: its gated blocks (and resampler) train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from kopru.model import KopruForConditionalGeneration

Recipe = Literal["align", "instruct", "single-stage"]
RECIPES: dict[str, str] = {  # recipe -> prompt template
    "align": "plain", "instruct": "chat", "single-stage": "chat", "qformer-stage1": "plain",
}


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" (peft's shorthand) or explicit module names such as ["q_proj", "v_proj"].
    target_modules: str | list[str] = "all-linear"


@dataclass
class OptimizerSettings:
    lr: float = 2e-5
    connector_lr: float | None = None  # None: lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    extra: dict = field(default_factory=dict)


def template_for(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[recipe]


def train_connector(model: KopruForConditionalGeneration) -> None:
    """Stage 1 (`align`): everything frozen except the modules the connector names for stage 1
    (`Connector.stage1_modules`: the projector; Q-Former + projection; gated blocks + resampler + projection)."""
    model.requires_grad_(False)
    for module in model.connector.stage1_modules():
        module.requires_grad_(True)


def train_connector_and_llm(model: KopruForConditionalGeneration) -> None:
    """Stage 2 (`instruct`, `single-stage`): the connector's stage-1 modules, the LLM unless the connector keeps it
    frozen (`cross_attention`: Flamingo, Llama-3.2-Vision), the encoder only when its config says `trainable`."""
    train_connector(model)
    model.vision.encoder.requires_grad_(model.config.vision.trainable)
    if model.connector.llm_trains_in_stage2:
        model.llm.requires_grad_(True)


def train_qformer(model: KopruForConditionalGeneration) -> None:
    """BLIP-2 stage 1 (`qformer-stage1`): the Q-Former alone (its ITC / ITM / ITG heads live in the pretrainer)."""
    if model.config.strategy != "qformer":
        raise ValueError(f"the qformer-stage1 recipe needs the qformer strategy, found {model.config.strategy!r}")
    model.requires_grad_(False)
    model.connector.qformer.requires_grad_(True)


# The one table of what trains in each recipe; `apply_recipe` applies it, `kopru explain` counts from it.
TRAINS: dict[str, Callable[[KopruForConditionalGeneration], None]] = {
    "align": train_connector, "instruct": train_connector_and_llm, "single-stage": train_connector_and_llm,
    "qformer-stage1": train_qformer,
}


def apply_recipe(model: KopruForConditionalGeneration, recipe: str, lora: LoraSettings | None = None) -> None:
    """Set requires_grad for `recipe` (`TRAINS`); wrap the LLM with LoRA adapters when `lora` is given."""
    template_for(recipe)
    if lora is not None and recipe in ("align", "qformer-stage1"):
        raise ValueError(f"LoRA adapts the LLM, which the {recipe} recipe keeps frozen; found lora settings")
    TRAINS[recipe](model)
    if lora is None:
        return
    if not model.connector.splices_into_text:
        raise ValueError("cross_attention keeps its base LLM frozen; LoRA applies to projection and qformer only")
    model.llm.requires_grad_(False)
    model.llm = get_peft_model(model.llm, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    ))


def merge_lora(model: KopruForConditionalGeneration) -> None:
    """Fold LoRA adapters into the LLM's weights so the saved model is a plain HF checkpoint."""
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()


def parameter_groups(model: KopruForConditionalGeneration, settings: OptimizerSettings) -> list[dict]:
    """Connector and LLM in separate groups (LLaVA's separate projector lr); no weight decay on norms/biases."""
    connector_ids = {id(p) for p in model.connector.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = param.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((id(param) in connector_ids, decays), []).append(param)
    result = []
    for (is_connector, decays), params in sorted(groups.items()):
        lr = settings.connector_lr if is_connector and settings.connector_lr is not None else settings.lr
        result.append({"params": params, "lr": lr, "weight_decay": settings.weight_decay if decays else 0.0,
                       "name": f"{'connector' if is_connector else 'llm'}{'' if decays else '-no-decay'}"})
    if not result:
        raise ValueError("nothing to train: every parameter is frozen for this recipe")
    return result


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total)"""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def make_optimizer(model: KopruForConditionalGeneration, settings: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(model, settings), betas=settings.betas, **settings.extra)
