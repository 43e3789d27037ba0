"""`--threads` and the default torch thread count of the commands that run a model (kopru.threads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kopru.cli import build_parser, main
from kopru.threads import default_threads

SRC = str(Path(__file__).resolve().parents[1] / "src")
# A child process runs a cheap command through the real entry point and prints the thread count torch ended with.
PROBE = ("import torch; from kopru.cli import main; main(['explain', '--list'{extra}]); "
         "print('threads', torch.get_num_threads())")


def probe(extra_args: list[str], **env: str) -> int:
    """torch.get_num_threads() after `kopru explain --list EXTRA_ARGS` in a fresh process with `env` added to an
    environment cleared of OMP_NUM_THREADS / MKL_NUM_THREADS."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    extra = "".join(f", {arg!r}" for arg in extra_args)
    done = subprocess.run([sys.executable, "-c", PROBE.format(extra=extra)], capture_output=True, text=True,
                          env={**base, "PYTHONPATH": SRC, **env}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1].split()[1])


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch):
    """main() sets torch's threads and OMP_NUM_THREADS for this process: put both back afterwards."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_default_rule() -> None:
    # half the CPUs, at least 1, at most 4
    assert [default_threads(cpus) for cpus in (1, 2, 3, 4, 6, 8, 16, 128)] == [1, 1, 1, 2, 3, 4, 4, 4]


def test_flag_reaches_torch_and_child_processes(restore_threads) -> None:
    assert main(["explain", "--list", "--threads", "3"]) == 0
    assert torch.get_num_threads() == 3
    assert os.environ["OMP_NUM_THREADS"] == "3"  # what `kopru compare`'s measuring child process inherits


def test_fresh_process_default_env_and_flag() -> None:
    cpus = len(os.sched_getaffinity(0))
    default = max(1, min(4, cpus // 2))
    assert probe([]) == default
    if cpus < 2:
        pytest.skip("one CPU: torch caps OMP_NUM_THREADS at the CPU count, so no setting differs from the default")
    # The user's setting is kept: a count other than the default (torch itself caps it at the CPU count) ...
    user = 1 if default > 1 else 2
    assert probe([], OMP_NUM_THREADS=str(user)) == user
    assert probe([], MKL_NUM_THREADS=str(user)) == user
    # ... unless --threads says otherwise.
    assert probe(["--threads", "3"], OMP_NUM_THREADS=str(user)) == 3


def test_every_computing_command_takes_the_flag(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    commands = {
        "demo": [], "train": [], "compare": [], "pretrain-tiny": ["--out", "x"], "explain": ["--list"],
        "convert": ["--from", "llava", "src", "dst"], "chat": ["--model", "m"], "serve": ["--model", "m"],
    }
    for command, args in commands.items():
        assert parser.parse_args([command, *args, "--threads", "2"]).threads == 2, command
        assert parser.parse_args([command, *args]).threads is None, command
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["demo", "--threads", bad])
        assert f"expected a positive whole number of threads, found {bad!r}" in capsys.readouterr().err
