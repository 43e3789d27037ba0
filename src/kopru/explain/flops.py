"""FLOPs: `torch.utils.flop_counter.FlopCounterMode` over forward passes on meta tensors (matmuls, convolutions and
attention, 2 per multiply-add), and the LLM's cost as a function of the sequence length."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(run: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@dataclass(frozen=True)
class SequenceCost:
    """Forward FLOPs of the LLM over L positions: fixed + per_position x L + attention x L^2 (full, not causal:
    FlopCounterMode counts what SDPA is asked to compute)."""

    fixed: float
    per_position: float
    attention: float

    @classmethod
    def fit(cls, run: Callable[[int], Any], lengths: tuple[int, int, int] = (8, 16, 24)) -> SequenceCost:
        """Exact for any forward whose FLOPs are quadratic in the length; one-token calls are left out because
        some models take another attention path for them."""
        x1, x2, x3 = lengths
        step = x2 - x1
        if x3 - x2 != step:
            raise ValueError(f"expected equally spaced lengths, found {lengths}")
        f1, f2, f3 = (count_flops(functools.partial(run, length)) for length in lengths)
        attention = (f3 - 2 * f2 + f1) / (2 * step**2)
        per_position = (f2 - f1) / step - attention * (x1 + x2)
        return cls(f1 - per_position * x1 - attention * x1**2, per_position, attention)

    def per_token(self, context: int) -> float:
        """One more token attending to `context` positions."""
        return self.per_position + self.attention * context


@dataclass(frozen=True)
class FlopTracer:
    """count / fit, or zeros when FLOPs are not wanted (Settings.flops=False)."""

    enabled: bool = True

    def count(self, run: Callable[[], Any]) -> float:
        return float(count_flops(run)) if self.enabled else 0.0

    def fit(self, run: Callable[[int], Any]) -> SequenceCost:
        return SequenceCost.fit(run) if self.enabled else SequenceCost(0.0, 0.0, 0.0)


def dense_flops(modules: Iterable[nn.Module], tokens: int) -> float:
    """2 x weights x tokens over the Linear / Conv layers of `modules` (each runs once per token)."""
    weights = sum(m.weight.numel() for module in modules for m in module.modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)))
    return 2.0 * weights * tokens
