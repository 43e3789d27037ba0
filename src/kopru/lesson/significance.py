"""95% intervals for accuracies and their differences, and the verdict rule of `kopru compare`.

Accuracy varies with the questions asked and with the training seed. The intervals come from a two-level
(hierarchical) bootstrap: each replicate draws the seeds with replacement, then within each drawn seed its
questions with replacement. A difference between two models trained with the same seeds and asked the same
questions (`kopru compare` evaluates every strategy of a seed on the same held-out subset) is paired: one draw of
questions serves both. A claim "A above B" holds when the whole interval of A - B is above 0, does not hold when
it is below, and is inconclusive at this scale otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive at this scale"
RESAMPLES = 2000
LEVEL = 0.95


def _checked(samples: Mapping[Any, Sequence[float]], what: str) -> dict[Any, np.ndarray]:
    arrays = {seed: np.asarray(values, dtype=float) for seed, values in samples.items()}
    empty = [seed for seed, values in arrays.items() if values.size == 0]
    if not arrays or empty:
        raise ValueError(f"{what}: expected at least one value for every seed, found seeds {sorted(arrays)} with "
                         f"none for {empty}")
    return arrays


def _interval(replicates: np.ndarray, estimate: float) -> dict[str, float]:
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return {"estimate": float(estimate), "low": float(low), "high": float(high)}


def _pooled_mean(arrays: Mapping[Any, np.ndarray]) -> float:
    return float(np.concatenate(list(arrays.values())).mean())


def bootstrap_mean(samples: Mapping[Any, Sequence[float]], seed: int = 0,
                   resamples: int = RESAMPLES) -> dict[str, float]:
    """{seed: per-question values (1.0 correct / 0.0 wrong)} -> the pooled mean and its 95% interval."""
    arrays = _checked(samples, "bootstrap_mean")
    rng = np.random.default_rng(seed)
    keys = list(arrays)
    replicates = np.empty(resamples)
    for b in range(resamples):
        drawn = [arrays[keys[i]] for i in rng.integers(len(keys), size=len(keys))]
        replicates[b] = np.concatenate([values[rng.integers(len(values), size=len(values))]
                                        for values in drawn]).mean()
    return _interval(replicates, _pooled_mean(arrays))


def bootstrap_difference(a: Mapping[Any, Sequence[float]], b: Mapping[Any, Sequence[float]], paired: bool,
                         seed: int = 0, resamples: int = RESAMPLES) -> dict[str, float]:
    """Mean of A minus mean of B, with its 95% interval, over the seeds both have.

    paired: A's and B's values of a seed are the same questions in the same order (one draw serves both);
    otherwise each side's questions are drawn on their own (e.g. English against Turkish questions).
    """
    a, b = _checked(a, "bootstrap_difference (A)"), _checked(b, "bootstrap_difference (B)")
    seeds = [s for s in a if s in b]
    if not seeds:
        raise ValueError(f"expected seeds in common, found {sorted(a)} and {sorted(b)}")
    if paired:
        unequal = [s for s in seeds if a[s].shape != b[s].shape]
        if unequal:
            raise ValueError(f"paired values need the same questions per seed; seeds {unequal} have "
                             f"{[(a[s].size, b[s].size) for s in unequal]}")
    rng = np.random.default_rng(seed)
    replicates = np.empty(resamples)
    for r in range(resamples):
        drawn = [seeds[i] for i in rng.integers(len(seeds), size=len(seeds))]
        left, right = [], []
        for s in drawn:
            pick = rng.integers(a[s].size, size=a[s].size)
            left.append(a[s][pick])
            right.append(b[s][pick if paired else rng.integers(b[s].size, size=b[s].size)])
        replicates[r] = np.concatenate(left).mean() - np.concatenate(right).mean()
    estimate = _pooled_mean({s: a[s] for s in seeds}) - _pooled_mean({s: b[s] for s in seeds})
    return _interval(replicates, estimate)


def judge(interval: Mapping[str, float], margin: float = 0.0) -> str:
    """The verdict on "A above B" from the interval of A - B: decisive only when the interval excludes 0
    (or the margin: `margin` > 0 asks for A above B by more than it)."""
    if interval["low"] > margin:
        return HOLDS
    if interval["high"] < margin:
        return FAILS
    return INCONCLUSIVE


def all_of(verdicts: Sequence[str]) -> str:
    """A claim made of several comparisons: it holds when each does, fails when any fails."""
    if any(v == FAILS for v in verdicts):
        return FAILS
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE


def separated(larger: Sequence[float], smaller: Sequence[float]) -> str:
    """The verdict on "larger > smaller" for repeated timings: holds when every repeat of one side is above every
    repeat of the other, fails when every one is below, inconclusive when their ranges overlap (noise decides)."""
    if not larger or not smaller:
        raise ValueError(f"expected repeats on both sides, found {len(larger)} and {len(smaller)}")
    if min(larger) > max(smaller):
        return HOLDS
    if max(larger) < min(smaller):
        return FAILS
    return INCONCLUSIVE
