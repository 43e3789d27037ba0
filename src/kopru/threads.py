"""How many CPU threads torch uses for the `kopru` commands that run a model (the `--threads` flag).

torch's own default is one intra-op thread per core. That is right on an idle machine and the worst choice on a
busy small one: every op waits for all of its threads, and one descheduled thread stalls them all. Measured on
this project's 2-core machine:

- busy (another engineer's tests keeping the load average at 2.6-3.6): `kopru demo` 8.9 s and 9.7 s with
  `--threads 1` against 58.3 s and 39.0 s with `--threads 2`;
- idle: `make demo` (`kopru compare`, default preset) took 12 min 20 s with 1 thread, and 10 min 24 s with 2 in the
  same session (a noisy hour: its TTFT spread was +-8 ms); the previous session measured 6 min 53 s with 2.

So the default is the cores that are idle, not a fixed share. The commands start with

- `--threads N` when it is given;
- otherwise whatever OMP_NUM_THREADS or MKL_NUM_THREADS says, when the user set one (torch already applied it
  at import: the convention torch, NumPy and torchrun follow, and Köprü leaves it alone);
- otherwise `default_threads()`: the CPUs this process may run on less the 1-minute load average, rounded, at
  least 1 (the rule `kopru pretrain-tiny` has used since it was written).

The count chosen is also exported as OMP_NUM_THREADS, so the processes a command starts (`kopru compare`
measures memory in a fresh one) use the same.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping

import torch

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or `taskset`'s limit), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on macOS or Windows
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows
        return None


def default_threads(cpus: int | None = None, load: float | None = None) -> int:
    """The idle CPUs: `cpus` (default `available_cpus()`) less `load` (default: the load average), rounded to the
    nearest whole number, at least 1. Without a load average, all `cpus`."""
    cpus = available_cpus() if cpus is None else cpus
    load = load_average() if load is None else load
    if load is None:
        return cpus
    return max(1, min(cpus, math.floor(cpus - load + 0.5)))


def configure_threads(requested: int | None, environ: MutableMapping[str, str] | None = None) -> tuple[int, str]:
    """Set torch's intra-op thread count by the rule in the module docstring; returns (threads, why)."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            raise ValueError(f"expected a positive number of threads, found {requested}")
        threads, why = requested, "--threads"
    else:
        user_set = next((name for name in THREAD_ENV_VARS if environ.get(name, "").strip()), None)
        if user_set is not None:
            return torch.get_num_threads(), user_set  # torch read it when it started: nothing to change
        threads, why = default_threads(), f"default: the idle ones of {available_cpus()} CPUs"
    torch.set_num_threads(threads)
    environ["OMP_NUM_THREADS"] = str(threads)  # for the child processes a command starts
    return threads, why


__all__ = ["THREAD_ENV_VARS", "available_cpus", "configure_threads", "default_threads", "load_average"]
