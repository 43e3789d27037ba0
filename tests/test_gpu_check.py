"""scripts/gpu_check.sh: its --dry run (what CI runs) leaves every figure as JSON with the keys a reader of a
GPU run will look for, the CUDA tests reported as skipped here; a failing step is recorded and the others run."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PRESETS = ["llava-7b", "blip2-7b", "mllama-11b"]
STEPS = ["install", "cuda_tests", *(f"generation_{preset}" for preset in PRESETS), "train"]
ENVIRONMENT = {"device", "torch", "transformers", "preset", "date"}


def _run(*args: str, python: str = sys.executable, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHON": python, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def _cuda_test_functions() -> set[str]:
    """The test functions tests/test_cuda.py defines (read from its source: no test module imports another)."""
    tree = ast.parse((ROOT / "tests" / "test_cuda.py").read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


@pytest.mark.slow
def test_dry_run_writes_every_figure_as_json(tmp_path: Path) -> None:
    done = _run("--dry", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry"] is True and summary["failed"] == []
    assert [step["name"] for step in summary["steps"]] == STEPS
    install, *ran = summary["steps"]
    assert install["skipped"] and install["exit_code"] is None  # --dry installs nothing
    for step in ran:
        assert step["exit_code"] == 0 and not step["timed_out"], step
        assert (tmp_path / step["log"]).stat().st_size > 0, step

    tests = json.loads((tmp_path / "cuda_tests.json").read_text())
    assert {case["test"].split("::")[1].split("[")[0] for case in tests["cases"]} == _cuda_test_functions()
    assert tests["skipped"] == tests["tests"], tests  # no CUDA device here
    assert all(case["message"] == "needs a CUDA device" for case in tests["cases"])

    for preset in PRESETS:
        figures = json.loads((tmp_path / f"generation_{preset}.json").read_text())
        assert set(figures) >= ENVIRONMENT and figures["preset"] == preset and figures["tiny"] is True
        assert figures["complete"] is True
        rows = figures["rows"]
        assert {(row["batch"], row["implementation"]) for row in rows} == {
            (batch, label) for batch in (1, 8) for label in ("HF eager", "Köprü eager")}
        for row in rows:
            assert "error" not in row, row
            assert row["ttft_ms"] > 0 and row["decode"] > 0 and row["peak_mib"] > 0, row
        assert len(figures["summary"]) == 2  # one ratio line per batch

    train = json.loads((tmp_path / "train.json").read_text())
    assert set(train) >= ENVIRONMENT and train["preset"] == "tiny" and train["complete"] is True
    assert {(row["stage"], row["implementation"]) for row in train["steps"]} == {
        (1, "HF LlavaForConditionalGeneration"), (1, "Köprü"), (2, "HF LlavaForConditionalGeneration"),
        (2, "Köprü"), ("2 + AdamW", "Köprü")}
    assert all(row["tokens_per_s"] > 0 and row["mfu"] is None for row in train["steps"])  # no MFU on CPU
    assert [row["batching"] for row in train["length_batching"]] == [
        "HF-style padded random batches", "Köprü length-grouped", "Köprü packed"]


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    # An interpreter that fails every step's command but still writes the summary (read from stdin: `python -`).
    failing = tmp_path / "python"
    failing.write_text(f'#!/bin/sh\nif [ "$1" = "-" ]; then exec {sys.executable} "$@"; fi\necho broken >&2\n'
                       "exit 3\n")
    failing.chmod(0o755)
    out = tmp_path / "out"
    done = _run("--dry", str(out), python=str(failing), timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == STEPS[1:]
    assert [step["exit_code"] for step in summary["steps"][1:]] == [3] * (len(STEPS) - 1)
    assert (out / "train.log").read_text() == "broken\n"


@pytest.mark.parametrize("args", [(), ("--dry",), ("a", "b"), ("--wet", "out")])
def test_usage_errors_name_what_was_expected(args) -> None:
    done = _run(*args, timeout=10)
    assert done.returncode == 2
    assert "usage: bash scripts/gpu_check.sh [--dry] OUT_DIR (expected one output folder, found:" in done.stderr
