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
# A child process runs a cheap command through the real entry point and prints the thread count torch ended with;
# the environment rules are probed through what that command calls (kopru.threads: 2 s a process against 5 s).
PROBE = ("import torch; from kopru.cli import main; main(['explain', '--list'{extra}]); "
         "print('threads', torch.get_num_threads())")
RULE_PROBE = ("import torch; from kopru.threads import configure_threads; configure_threads(None); "
              "print('threads', torch.get_num_threads())")


def probe(extra_args: list[str] | None, **env: str) -> int:
    """torch.get_num_threads() after `kopru explain --list EXTRA_ARGS` (EXTRA_ARGS None: after
    `configure_threads(None)` alone) in a fresh process with `env` added to an environment cleared of
    OMP_NUM_THREADS / MKL_NUM_THREADS."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = RULE_PROBE if extra_args is None else PROBE.format(extra="".join(f", {arg!r}" for arg in extra_args))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
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


def test_default_rule_is_the_idle_cpus() -> None:
    # (cpus, load average) -> threads: the CPUs less the load, rounded, at least 1, at most the CPUs
    cases = {(2, 0.0): 2, (2, 0.4): 2, (2, 0.6): 1, (2, 3.2): 1, (1, 0.0): 1, (8, 2.6): 5, (16, 40.0): 1,
             (4, -0.0): 4}
    assert {case: default_threads(*case) for case in cases} == cases


def test_flag_reaches_torch_and_child_processes(restore_threads) -> None:
    assert main(["explain", "--list", "--threads", "3"]) == 0
    assert torch.get_num_threads() == 3
    assert os.environ["OMP_NUM_THREADS"] == "3"  # what `kopru compare`'s measuring child process inherits


@pytest.mark.slow
def test_fresh_process_default_env_and_flag() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert 1 <= probe([]) <= cpus  # the idle CPUs: how many depends on the load at that moment
    if cpus < 2:
        pytest.skip("one CPU: torch caps OMP_NUM_THREADS at the CPU count, so no setting differs from the default")
    # The user's setting is kept, whatever the load (torch itself caps it at the CPU count) ...
    for user in (1, 2):
        assert probe(None, OMP_NUM_THREADS=str(user)) == user
        assert probe(None, MKL_NUM_THREADS=str(user)) == user
    # ... unless --threads says otherwise.
    assert probe(["--threads", "3"], OMP_NUM_THREADS="1") == 3


def test_every_computing_command_takes_the_flag(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    commands = {
        "demo": [], "train": [], "compare": [], "pretrain-tiny": ["--out", "x"], "explain": ["--list"],
        "convert": ["--from", "llava", "src", "dst"], "export": ["--to", "llava", "src", "dst"],
        "chat": ["--model", "m"], "serve": ["--model", "m"],
    }
    for command, args in commands.items():
        assert parser.parse_args([command, *args, "--threads", "2"]).threads == 2, command
        assert parser.parse_args([command, *args]).threads is None, command
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["demo", "--threads", bad])
        assert f"expected a positive whole number of threads, found {bad!r}" in capsys.readouterr().err
