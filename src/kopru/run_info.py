"""What a measurement ran on, for the JSON files the benchmarks write (`--json PATH`): the device, the library
versions, the preset and the time, so that a figure read later can be told apart from one taken elsewhere."""

from __future__ import annotations

import datetime
import json
import math
import platform
from pathlib import Path
from typing import Any

import torch
import transformers


def environment(preset: str) -> dict[str, Any]:
    """The device name (the GPU's, or the CPU's architecture), torch / transformers / Python versions, CUDA's
    version when there is one, the preset and the UTC date and time."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "preset": preset,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _finite(value: Any) -> Any:
    """JSON has no infinity or NaN: a figure that was never measured is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """`payload` as indented, strictly valid JSON at `path` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                    encoding="utf-8")
