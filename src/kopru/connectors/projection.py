"""Strategy 1, LLaVA: a linear layer or a GELU MLP maps each image patch to one LLM token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from kopru.connectors.base import Connector, register_strategy


@dataclass
class ProjectionConfig:
    kind: Literal["linear", "mlp"] = "mlp"
    # Number of Linear layers of the MLP, GELU between them; 2 is LLaVA-1.5's `mlp2x_gelu`.
    depth: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"projection kind must be 'linear' or 'mlp', found {self.kind!r}")
        if self.kind == "mlp" and self.depth < 1:
            raise ValueError(f"projection depth must be >= 1, found {self.depth}")


@register_strategy("projection")
class ProjectionConnector(Connector):
    config_class = ProjectionConfig

    def __init__(self, config: ProjectionConfig, vision_dim: int, llm_config: PretrainedConfig) -> None:
        super().__init__()
        llm_dim = llm_config.hidden_size
        depth = 1 if config.kind == "linear" else config.depth
        layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        self.layers = nn.Sequential(*layers)

    @classmethod
    def output_tokens(cls, config: ProjectionConfig, vision_tokens: int) -> int:
        return vision_tokens

    @classmethod
    def keeps_patch_grid(cls, config: ProjectionConfig) -> bool:
        return True

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.layers(image_features)
