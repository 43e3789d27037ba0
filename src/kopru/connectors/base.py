"""What every connection strategy provides, and the registry that picks one by name."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class Connector(nn.Module):
    """Turns vision-encoder features into something the LLM consumes.

    Spliced strategies (`projection`, `qformer`) return one LLM-width vector per image position; the model
    writes them into the text embeddings at the image placeholders. The `cross_attention` strategy returns
    the image states its gated blocks attend to, and the text holds a single placeholder per image.
    """

    config_class: ClassVar[type]
    # True: image features take LLM positions; False: they are reached through cross-attention.
    splices_into_text: ClassVar[bool] = True
    # Whether instruction tuning (stage 2) trains the LLM too; cross-attention keeps it frozen.
    llm_trains_in_stage2: ClassVar[bool] = True

    @classmethod
    def output_tokens(cls, config: Any, vision_tokens: int) -> int:
        """Image vectors this connector produces per image from `vision_tokens` encoder tokens."""
        raise NotImplementedError

    @classmethod
    def keeps_patch_grid(cls, config: Any) -> bool:
        """Whether output token i is still patch i of the input grid (then anyres can unpad it, as LLaVA-NeXT)."""
        return False

    # Subclasses take (config, vision_dim: int, llm_config: transformers.PretrainedConfig).

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:  # [images, tokens, vision_dim]
        raise NotImplementedError

    def attach(self, llm: nn.Module) -> None:
        """Connect to the LLM's internals, if the strategy needs to (cross-attention hooks its layers)."""

    def init_pretrained_weights(self) -> None:
        """Load pretrained initial weights the config names (Q-Former from BERT); only for a new model."""

    def stage1_modules(self) -> list[nn.Module]:
        """The modules trained in stage 1 (alignment); by default the whole connector."""
        return [self]


_STRATEGIES: dict[str, type[Connector]] = {}


def register_strategy(name: str):
    def decorator(cls: type[Connector]) -> type[Connector]:
        _STRATEGIES[name] = cls
        cls.strategy_name = name
        return cls

    return decorator


def strategy_class(name: str) -> type[Connector]:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(_STRATEGIES)}") from None


def available_strategies() -> list[str]:
    return sorted(_STRATEGIES)
