"""Flamingo's Perceiver resampler: a fixed number of learned latents summarise any number of image tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ResamplerConfig:
    num_latents: int = 64
    depth: int = 6
    num_heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4

    def __post_init__(self) -> None:
        for name in ("num_latents", "depth", "num_heads", "head_dim", "ff_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"resampler {name} must be >= 1, found {getattr(self, name)}")


class PerceiverAttention(nn.Module):
    """Latents attend to [image tokens; latents] (Flamingo appends the latents to the keys)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * num_heads * head_dim, bias=False)
        self.to_out = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        batch = media.shape[0]
        media, latents = self.norm_media(media), self.norm_latents(latents)
        query = self.to_q(latents).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        keys, values = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        keys = keys.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, keys, values)
        return self.to_out(out.transpose(1, 2).reshape(batch, -1, self.num_heads * self.head_dim))


class PerceiverResampler(nn.Module):
    def __init__(self, config: ResamplerConfig, dim: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.num_latents, dim) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(config.depth):
            feed_forward = nn.Sequential(
                nn.LayerNorm(dim),
                nn.Linear(dim, config.ff_mult * dim, bias=False),
                nn.GELU(),
                nn.Linear(config.ff_mult * dim, dim, bias=False),
            )
            self.layers.append(nn.ModuleList([PerceiverAttention(dim, config.num_heads, config.head_dim), feed_forward]))
        self.norm = nn.LayerNorm(dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """[images, tokens, dim] -> [images, num_latents, dim]"""
        latents = self.latents.expand(image_features.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = latents + attention(image_features, latents)
            latents = latents + feed_forward(latents)
        return self.norm(latents)
