"""How many CPU threads torch uses for the `kopru` commands that run a model (the `--threads` flag).

torch's own default is one intra-op thread per core. For Köprü's tiny built-in models that is the worst choice on
a small shared machine: their matrices are too small to gain from a second thread, every op waits for all of its
threads, and one descheduled thread stalls them all. On this project's 2-core machine, with another engineer's
tests keeping the load average at 2.6-3.6, `kopru demo` took 8.9 s and 9.7 s with `--threads 1` against 58.3 s
and 39.0 s with `--threads 2` (torch's default there). So the commands start with

- `--threads N` when it is given;
- otherwise whatever OMP_NUM_THREADS or MKL_NUM_THREADS says, when the user set one (torch already applied it
  at import: the convention torch, NumPy and torchrun follow, and Köprü leaves it alone);
- otherwise `default_threads()`: half the CPUs this process may run on, at least 1 and at most 4. Half leaves
  room for whatever else runs, which is what made the difference above; the cap of 4 keeps a default from
  taking over a large shared machine (a real model on a CPU may well want more: ask with --threads).

The count chosen is also exported as OMP_NUM_THREADS, so the processes a command starts (`kopru compare`
measures memory in a fresh one) use the same.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
MAX_DEFAULT_THREADS = 4


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or `taskset`'s limit), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on macOS or Windows
        return os.cpu_count() or 1


def default_threads(cpus: int | None = None) -> int:
    """Half of `cpus` (default: `available_cpus()`), at least 1, at most MAX_DEFAULT_THREADS."""
    cpus = available_cpus() if cpus is None else cpus
    return max(1, min(MAX_DEFAULT_THREADS, cpus // 2))


def configure_threads(requested: int | None, environ: MutableMapping[str, str] | None = None) -> tuple[int, str]:
    """Set torch's intra-op thread count by the rule in the module docstring; returns (threads, why)."""
    import torch

    environ = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            raise ValueError(f"expected a positive number of threads, found {requested}")
        threads, why = requested, "--threads"
    else:
        user_set = next((name for name in THREAD_ENV_VARS if environ.get(name, "").strip()), None)
        if user_set is not None:
            return torch.get_num_threads(), user_set  # torch read it when it started: nothing to change
        threads, why = default_threads(), f"default: half of {available_cpus()} CPUs, at most {MAX_DEFAULT_THREADS}"
    torch.set_num_threads(threads)
    environ["OMP_NUM_THREADS"] = str(threads)  # for the child processes a command starts
    return threads, why


__all__ = ["MAX_DEFAULT_THREADS", "THREAD_ENV_VARS", "available_cpus", "configure_threads", "default_threads"]
