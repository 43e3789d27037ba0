"""The intervals and verdict rule behind `kopru compare`'s verdicts, against hand-computed cases and a normal
approximation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kopru.lesson.significance import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    all_of,
    bootstrap_difference,
    bootstrap_mean,
    judge,
    separated,
)


def test_a_constant_has_a_point_interval():
    assert bootstrap_mean({0: [1.0] * 10, 1: [1.0] * 5}) == {"estimate": 1.0, "low": 1.0, "high": 1.0}


def test_interval_of_a_proportion_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    values = (rng.random(400) < 0.7).astype(float)
    found = bootstrap_mean({0: values})
    p = values.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / values.size)
    assert found["estimate"] == pytest.approx(p)
    assert found["low"] == pytest.approx(p - half, abs=0.01) and found["high"] == pytest.approx(p + half, abs=0.01)


def test_seeds_that_disagree_widen_the_interval():
    """Within each seed the questions agree; the seeds do not: resampling seeds is what shows it."""
    same = bootstrap_mean({0: [1.0, 0.0] * 50, 1: [1.0, 0.0] * 50, 2: [1.0, 0.0] * 50})
    apart = bootstrap_mean({0: [1.0] * 100, 1: [0.0] * 100, 2: [1.0, 0.0] * 50})
    assert same["estimate"] == apart["estimate"] == 0.5
    assert apart["high"] - apart["low"] > 2 * (same["high"] - same["low"])


def test_pairing_removes_what_both_models_share():
    """Two models that get the same hard questions wrong and differ on a few: paired, the difference is clear;
    unpaired, the questions' own spread hides it."""
    rng = np.random.default_rng(0)
    hard = rng.random(200) < 0.5
    a = (~hard).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:12]] = 0.0  # B misses 12 questions A gets right, nothing else differs
    paired = bootstrap_difference({0: a}, {0: b}, paired=True)
    unpaired = bootstrap_difference({0: a}, {0: b}, paired=False)
    assert paired["estimate"] == unpaired["estimate"] == pytest.approx(12 / 200)
    assert judge(paired) == HOLDS and judge(unpaired) == INCONCLUSIVE


def test_paired_values_need_the_same_questions():
    with pytest.raises(ValueError, match="same questions"):
        bootstrap_difference({0: [1.0, 0.0]}, {0: [1.0]}, paired=True)
    with pytest.raises(ValueError, match="seeds in common"):
        bootstrap_difference({0: [1.0]}, {1: [1.0]}, paired=False)
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_mean({0: []})


def test_judge_is_decisive_only_when_the_interval_excludes_zero():
    assert judge({"estimate": 0.1, "low": 0.01, "high": 0.2}) == HOLDS
    assert judge({"estimate": -0.1, "low": -0.2, "high": -0.01}) == FAILS
    assert judge({"estimate": 0.1, "low": -0.01, "high": 0.2}) == INCONCLUSIVE
    assert all_of([HOLDS, HOLDS]) == HOLDS
    assert all_of([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert all_of([INCONCLUSIVE, FAILS]) == FAILS


def test_timings_decide_only_when_the_repeats_do_not_overlap():
    assert separated([10.0, 11.0, 12.0], [1.0, 2.0, 9.9]) == HOLDS
    assert separated([1.0, 2.0], [3.0, 4.0]) == FAILS
    assert separated([5.0, 8.0], [7.0, 9.0]) == INCONCLUSIVE
    with pytest.raises(ValueError, match="repeats on both sides"):
        separated([], [1.0])
