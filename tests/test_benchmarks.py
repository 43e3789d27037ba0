"""The benchmark scripts are not timed tests, but they must keep running and measuring: each one end to end at
its smallest size (a refactor elsewhere once broke an import in one of them unnoticed), its figures read back
from what it prints."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"([\d,]+(?:\.\d+)?)"


def _run(*args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _positive(text: str) -> float:
    value = float(text.replace(",", ""))
    assert math.isfinite(value) and value > 0, text
    return value


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-blip2", "tiny-mllama"])
@pytest.mark.slow
def test_generation_benchmark_measures_both_sides(preset):
    out = _run("benchmarks/generation_benchmark.py", "--preset", preset, "--skip-compiled", "--repeats", "1",
               "--batch", "1", "--threads", "1")
    assert "failed" not in out
    # One row per implementation: strategy, batch, label, TTFT ms, decode tok/s, peak MiB.
    rows = re.findall(rf"^(\w+)\s+1\s+(HF eager|Köprü eager)\s+{NUMBER}\s+{NUMBER}\s+(\d+)$", out, re.MULTILINE)
    assert sorted(row[1] for row in rows) == ["HF eager", "Köprü eager"], out
    assert len({row[0] for row in rows}) == 1
    for _, _, ttft, decode, _ in rows:
        _positive(ttft), _positive(decode)
    # The summary's ratio is the rows' ratio.
    decode = {label: float(value.replace(",", "")) for _, label, _, value, _ in rows}
    ratio = re.search(rf"batch 1: Köprü best decode {NUMBER} tok/s \(Köprü eager\) = {NUMBER}x HF's best", out)
    assert ratio, out
    assert float(ratio[2]) == pytest.approx(decode["Köprü eager"] / decode["HF eager"], abs=0.01)


@pytest.mark.slow
def test_serve_benchmark_sends_one_at_a_time_then_all_at_once():
    out = _run("benchmarks/serve_benchmark.py", "--requests", "3", "--max-tokens", "2", "--rounds", "1",
               "--threads", "1")
    rows = dict(re.findall(r"^\| (one at a time|all at once) \| (.*) \|$", out, re.MULTILINE))
    assert set(rows) == {"one at a time", "all at once"}, out
    for mode, cells in rows.items():
        seconds, per_second, tokens, batches = (cell.strip() for cell in cells.split(" | "))
        _positive(seconds), _positive(per_second), _positive(tokens)
        used = ast.literal_eval(batches)  # the server's own batch sizes (GET /metrics) during that round
        assert sum(int(size) * count for size, count in used.items()) == 3, (mode, used)
        if mode == "one at a time":
            assert used == {"1": 3}, used  # sequential requests can never share a batch


@pytest.fixture
def train_benchmark(load_script):
    return load_script("benchmarks/train_benchmark.py")


@pytest.mark.slow
def test_train_benchmark_measures_and_length_grouping_cuts_padding(train_benchmark):
    """The script's two measurements, in this process at a size below its smallest preset (the script itself
    takes 25 s here)."""
    bench = train_benchmark
    preset = dataclasses.replace(bench.PRESETS["tiny"], batch=2, text_tokens=8, lengths=(20, 80))
    torch.manual_seed(0)
    steps = bench.step_benchmark(preset, torch.device("cpu"), torch.float32, repeats=1)
    assert {(row["stage"], row["implementation"].split()[0]) for row in steps} >= {
        (1, "HF"), (1, "Köprü"), (2, "HF"), (2, "Köprü")}
    assert all(math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0 for row in steps)
    padding = {row["batching"]: row["padding"] for row in bench.length_benchmark(preset, torch.device("cpu"),
                                                                                  torch.float32, repeats=1)}
    # The same samples in batches of the same size: batching them sorted by length minimises the padding (the sum
    # of the batches' longest lengths is smallest), so it can only be at most the random order's. (Packing's waste
    # depends on the lengths; tests/test_batching.py tests the packing itself.)
    assert padding["Köprü length-grouped"] < padding["HF-style padded random batches"]
    assert set(padding) == {"HF-style padded random batches", "Köprü length-grouped", "Köprü packed"}


def test_train_benchmark_refuses_lengths_out_of_order(train_benchmark, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_benchmark.main(["--lengths", "128", "32"])
    assert exit_info.value.code == 2
    assert "--lengths expects 0 < SHORTEST <= LONGEST, found 128 32" in capsys.readouterr().err
