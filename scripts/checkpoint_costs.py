"""What the checkpoint guarantees cost (the README's figures): checking a checkpoint against its manifest, and
fingerprinting the training data for the resume check.

    python scripts/checkpoint_costs.py [--width 8192] [--samples 100000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from kopru.data.sample import Sample, samples_fingerprint
from kopru.training.checkpoint import save_checkpoint, verify_checkpoint


def checkpoint_check(width: int) -> tuple[float, float, float]:
    """(MiB checked, seconds to save, seconds to check) for one Linear(width, width) trained one AdamW step."""
    model = nn.Linear(width, width)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, width)).sum().backward()
    optimizer.step()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        path = save_checkpoint(folder, model, optimizer, scheduler, {"step": 1})
        saved = time.perf_counter() - started
        size = sum(f.stat().st_size for f in Path(path).iterdir()) / 2**20
        started = time.perf_counter()
        verify_checkpoint(path)
        return size, saved, time.perf_counter() - started


def fingerprint(count: int) -> float:
    """Seconds to fingerprint `count` LLaVA-style samples (two turns each way, one image path)."""
    samples = [Sample([{"role": "user", "content": "<image>\nWhat is shown in this picture? Describe it in detail."},
                       {"role": "assistant", "content": "A long answer about the picture. " * 12},
                       {"role": "user", "content": "And what colour is it?"},
                       {"role": "assistant", "content": "Red, mostly, with some blue."}],
                      [f"coco/train2017/{i:012d}.jpg"], id=str(i)) for i in range(count)]
    started = time.perf_counter()
    samples_fingerprint(samples)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8192, help="Linear(width, width): 8192 gives 768 MiB of files")
    parser.add_argument("--samples", type=int, default=100_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    size, saved, checked = checkpoint_check(args.width)
    print(f"checkpoint of {size:,.0f} MiB: saved (hashed, fsynced) in {saved:.2f} s, checked in {checked:.2f} s "
          f"({size / checked:,.0f} MiB/s)")
    print(f"fingerprint of {args.samples:,} LLaVA-style samples: {fingerprint(args.samples):.2f} s")


if __name__ == "__main__":
    main()
