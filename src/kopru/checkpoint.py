"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint folder holds `trainable.safetensors` (the parameters that train), `optimizer.safetensors` +
`optimizer.json`, `rng.safetensors` and `trainer_state.json` (step, data position, scheduler, skip counts,
Python / NumPy RNG). It is written under a temporary name and renamed into place, so a run killed mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kopru.paths import atomic_directory

LATEST = "latest"


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded, on CPU) tensors of the parameters that train; a collective call under FSDP."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_FULL)
    return {name: tensor.contiguous() for name, tensor in state.items() if name in trainable}


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """The full optimizer state, keyed by parameter name (the same with or without FSDP): tensors apart, the rest
    JSON."""
    tensors, scalars = {}, {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}::{key}"] = value.contiguous()
            else:
                scalars[f"{name}::{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       meta: dict) -> None:
    state: dict[str, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        name, field = key.rsplit("::", 1)
        state.setdefault(name, {})[field] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
) -> Path:
    """Write `directory/checkpoint-{step}` atomically and point `directory/latest` at it.

    Every process calls it (gathering sharded state is collective); process 0 writes.
    """
    weights = trainable_state(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    directory = Path(directory)
    if dist.is_initialized() and dist.get_rank() != 0:
        return directory / f"checkpoint-{trainer_state['step']}"
    tensors, meta = _optimizer_tensors(optimizer_state)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{trainer_state['step']}"
    with atomic_directory(directory / name) as staging:
        save_file(weights, str(staging / "trainable.safetensors"))
        save_file(tensors, str(staging / "optimizer.safetensors"))
        (staging / "optimizer.json").write_text(json.dumps(meta))
        save_file({"torch": torch.get_rng_state()}, str(staging / "rng.safetensors"))
        numpy_state = np.random.get_state()
        state = {
            **trainer_state,
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "python_rng": _to_json(random.getstate()),
            "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        }
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=1))
    pointer = directory / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    pointer.replace(directory / LATEST)
    return directory / name


def latest_checkpoint(directory: str | Path) -> Path | None:
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; return the trainer state (step, data position, ...)."""
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"checkpoint {path} does not fit this run's trainable parameters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (same recipe and model config expected)"
        )
    full_shapes = {name: tuple(t.shape) for name, t in get_model_state_dict(model, options=_FULL).items()}
    for name, tensor in weights.items():
        if full_shapes[name] != tuple(tensor.shape):
            raise ValueError(f"checkpoint {path}: {name} expected {full_shapes[name]}, found {tuple(tensor.shape)}")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    _restore_optimizer(model, optimizer, load_file(str(path / "optimizer.safetensors")),
                       json.loads((path / "optimizer.json").read_text()))
    state = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict({**scheduler.state_dict(), **state.pop("scheduler")})
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    random.setstate(_from_json(state.pop("python_rng")))
    numpy_state = state.pop("numpy_rng")
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    return state


def _to_json(value: Any) -> Any:
    return [_to_json(v) for v in value] if isinstance(value, tuple | list) else value


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value
