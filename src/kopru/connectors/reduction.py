"""Connector-side token reduction and packing: the k x k reductions (`pixel_shuffle`, `avg_pool`) applied to an
encoder pass's patch grid before the connector, and LLaVA-NeXT's order of an anyres image's features. The grids'
sizes are `kopru.geometry`'s (`ImagePlan.grid`, `AnyresLayout`); this module only moves the vectors.
"""

from __future__ import annotations

import torch
from torch import nn

from kopru.config import ResolutionConfig
from kopru.geometry import AnyresLayout


class TokenReduction(nn.Module):
    """k x k patch reduction on a [images, rows * columns, dim] grid, before the connector. k = 1: unchanged."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def output_dim(self, dim: int) -> int:
        return dim

    def blocks(self, features: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """[N, rows * columns, D] -> [N, rows / k, columns / k, k * k, D]: each output token's k x k block, its
        patches in row-major order."""
        k = self.factor
        if rows % k or columns % k or features.shape[1] != rows * columns:
            raise ValueError(
                f"a {k}x{k} reduction needs a patch grid divisible by {k}; found {features.shape[1]} tokens for a "
                f"{rows}x{columns} grid"
            )
        n, _, dim = features.shape
        grid = features.view(n, rows // k, k, columns // k, k, dim).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(n, rows // k, columns // k, k * k, dim)

    def forward(self, features: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        return features


class PixelShuffle(TokenReduction):
    """Fold each k x k block into one token k^2 wider (Idefics3, InternVL, Qwen2-VL's merge before its MLP)."""

    def output_dim(self, dim: int) -> int:
        return dim * self.factor**2

    def forward(self, features: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        return self.blocks(features, rows, columns).flatten(3).flatten(1, 2)


class AveragePool(TokenReduction):
    """Average each k x k block into one token of the same width."""

    def forward(self, features: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        return self.blocks(features, rows, columns).mean(3).flatten(1, 2)


TOKEN_REDUCTIONS: dict[str, type[TokenReduction]] = {
    "none": TokenReduction, "pixel_shuffle": PixelShuffle, "avg_pool": AveragePool,
}


def token_reduction(resolution: ResolutionConfig) -> TokenReduction:
    return TOKEN_REDUCTIONS[resolution.reduction](resolution.merge_size)


def pack_anyres(tile_features: torch.Tensor, layout: AnyresLayout, newline: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT's order of one image's features: the base view, then the tiled view's patch grid with the
    padding rows/columns removed, each grid row ended by `newline`.

    tile_features: [1 + tiles, side * side, dim] (base view first, tiles row by row) -> [layout.tokens, dim]
    """
    tile_rows, tile_columns = layout.tiles
    per_tile, dim = tile_features.shape[1:]
    side = round(per_tile**0.5)
    base, tiles = tile_features[0], tile_features[1:]
    grid = tiles.view(tile_rows, tile_columns, side, side, dim).permute(0, 2, 1, 3, 4)
    grid = grid.reshape(tile_rows * side, tile_columns * side, dim)
    rows, columns = layout.grid
    top, left = (grid.shape[0] - rows) // 2, (grid.shape[1] - columns) // 2
    grid = grid[top:top + rows, left:left + columns]
    if layout.newline:
        grid = torch.cat([grid, newline.to(grid.dtype).expand(rows, 1, dim)], dim=1)
    return torch.cat([base, grid.reshape(-1, dim)])
