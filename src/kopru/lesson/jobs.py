"""Training runs side by side: each job in its own fresh process with one torch thread (`kopru compare`).

Kept apart from `kopru.lesson.compare` so that a worker process starts on torch and transformers' top level
alone (2.5-3 s here, against 5-6 s with the model code); the jobs it runs import what they need.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm


def _init_worker(threads: int, log_dir: str | None) -> None:
    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    if log_dir is not None:
        # Each run's own progress bars and messages go to a log file (the training loop's bars cannot be turned
        # off from outside), so the terminal shows one bar, this process's, per finished run.
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        sys.stderr = open(Path(log_dir) / f"worker-{os.getpid()}.log", "a", buffering=1)  # noqa: SIM115


def run_jobs(jobs: list[tuple[Callable[..., Any], tuple, dict[str, Any]]], workers: int, desc: str,
             log_dir: str | Path | None = None) -> list[Any]:
    """Each job's result, in the order given. With `workers` > 1 the jobs run in that many fresh processes with one
    torch thread each: the tiny models are too small for a second thread to help one run (0.36 s a step with
    one thread on a busy machine against 1.4 s with two), so two runs side by side nearly halve the wall time.
    A process starts with `spawn` (a forked torch with threads running can hang); its stderr (progress bars,
    warnings) goes to `log_dir`/worker-PID.log when given."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*args, **kwargs) for fn, args, kwargs in tqdm(jobs, desc=desc)]
    context = multiprocessing.get_context("spawn")
    results: list[Any] = [None] * len(jobs)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_init_worker,
                             initargs=(1, None if log_dir is None else str(log_dir))) as pool:
        futures = {pool.submit(fn, *args, **kwargs): i for i, (fn, args, kwargs) in enumerate(jobs)}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc):
            results[futures[future]] = future.result()
    return results
