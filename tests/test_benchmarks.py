"""The benchmark scripts are not timed tests, but they must keep running: each one's code path, at the smallest
size, end to end (a refactor elsewhere once broke an import in one of them unnoticed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.parametrize("script", ["generation_benchmark.py", "serve_benchmark.py", "train_benchmark.py"])
@pytest.mark.slow
def test_benchmark_scripts_start(script):
    assert "usage:" in _run(f"benchmarks/{script}", "--help")


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-blip2", "tiny-mllama"])
@pytest.mark.slow
def test_generation_benchmark_runs_at_tiny_size(preset):
    out = _run("benchmarks/generation_benchmark.py", "--preset", preset, "--skip-compiled", "--repeats", "1",
               "--batch", "1", "--threads", "1")
    assert "HF eager" in out and "Köprü eager" in out and "failed" not in out
