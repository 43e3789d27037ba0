"""Latency and memory of a saved model (`kopru compare`'s per-run figures): time to first token and decode speed in
this process, peak memory in a fresh one. Apart from `kopru.lesson.compare`, so that the fresh process imports the
model and nothing of the comparison (plots, training).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from kopru.model import KopruForConditionalGeneration


def _latency_batch(model, processor) -> dict[str, torch.Tensor]:
    """One image and a short question at batch 1: the prompt every latency and memory figure uses."""
    from PIL import Image

    image = Image.new("RGB", (64, 64), (30, 60, 220))
    batch = processor(["<image>\nHow many squares are there?"], [[image]], padding_side="left",
                      add_special_tokens=False)
    return {k: v.to(model.device) for k, v in batch.items()}


@torch.no_grad()
def measure_latency(model, processor, new_tokens: int = 16, repeats: int = 3) -> tuple[float, float]:
    """Time to first token (ms) and decode tokens/s, batch 1, greedy, fastest of `repeats`."""
    batch = _latency_batch(model, processor)
    cuda = model.device.type == "cuda"

    def timed(tokens: int) -> float:
        best = float("inf")
        for _ in range(repeats + 1):  # the first call warms up
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(**batch, max_new_tokens=tokens, eos_token_id=[])
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    first, whole = timed(1), timed(new_tokens)
    return 1000 * first, (new_tokens - 1) / max(whole - first, 1e-9)


def measure_peak_memory(model_dir: str, new_tokens: int = 16) -> float | None:
    """Peak memory (MB) of loading the saved model and generating `new_tokens` for the latency prompt, in a fresh
    process so that nothing this process allocated before (training, other variants) counts: CUDA's allocator
    peak on GPU, else the process's peak resident set (Linux; Python, torch and the weights included, so compare
    variants by their differences). None where it cannot be read."""
    code = f"from kopru.lesson.measure import _peak_memory_child; _peak_memory_child({model_dir!r}, {new_tokens})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring peak memory of {model_dir} failed:\n{done.stderr[-2000:]}")
    value = json.loads(done.stdout.strip().splitlines()[-1])["peak_memory_mb"]
    return None if value is None else float(value)


def _peak_memory_child(model_dir: str, new_tokens: int) -> None:
    model, processor = KopruForConditionalGeneration.from_pretrained(model_dir)
    if torch.cuda.is_available():
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model.generate(**_latency_batch(model, processor), max_new_tokens=new_tokens, eos_token_id=[])
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb()
    print(json.dumps({"peak_memory_mb": peak}))


def reset_peak_rss() -> None:
    """Linux: start this process's peak resident set (VmHWM) afresh, at the current resident set."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float | None:
    """This process's peak resident set in MB since start or `reset_peak_rss` (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
