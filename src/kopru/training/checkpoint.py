"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically,
each file's size and sha256 recorded and checked before a resume trusts it.

A checkpoint folder holds `trainable.safetensors` (the parameters that train), `optimizer.safetensors` +
`optimizer.json`, `rng.safetensors`, `trainer_state.json` (step, data position, scheduler, skipped samples, the
run's settings, Python / NumPy RNG) and `manifest.json` (size and sha256 of each of those files). It is written
under a temporary name and renamed into place, so a run killed mid-write leaves the previous checkpoint intact
and a `.checkpoint-N.*` folder that the next start removes (`remove_partial_saves`).

`latest` names the newest checkpoint folder. A resume (`resume_checkpoint`) takes it when it is intact, and
otherwise the newest intact `checkpoint-N` of the folder, saying which checkpoint it skipped and why: a
truncated, missing or changed file is one line naming the file with what was expected and what was found. A
`latest` naming anything but a `checkpoint-N` folder inside the output folder is never followed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
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
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kopru-checkpoint/1"
# Every file a checkpoint needs, in the order they are checked (the manifest lists each with size and sha256).
CHECKPOINT_FILES = ("trainer_state.json", "trainable.safetensors", "optimizer.safetensors", "optimizer.json",
                    "rng.safetensors")
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# What a killed save or rotation leaves: atomic_directory's staging folders (`.checkpoint-N.<random>`,
# `.final.<random>`), rotation's `.checkpoint-N.deleting`, and the pointer's temporary file.
_PARTIAL_NAME = re.compile(r"\.(checkpoint-\d+|final)\..+|\." + LATEST + r"\.tmp")

Log = Callable[[str], None]

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; the message is one line naming the file, what was expected and found."""


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
    keep_last: int | None = None,
    log: Log | None = None,
) -> Path:
    """Write `directory/checkpoint-{step}` atomically with its manifest, point `directory/latest` at it, then keep
    only the newest `keep_last` checkpoints (None: all) and whatever `latest` names.

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
        # Hashed as read back from disk, so the manifest describes the bytes a resume will find.
        files = {}
        for file in CHECKPOINT_FILES:
            size, digest = _digest(staging / file, sync=True)
            files[file] = {"bytes": size, "sha256": digest}
        (staging / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))
    pointer = directory / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    pointer.replace(directory / LATEST)
    if keep_last is not None:
        rotate_checkpoints(directory, keep_last, log)
    return directory / name


def _digest(path: Path, sync: bool = False) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks; `sync` also flushes it to the disk."""
    with open(path, "rb") as handle:
        if sync:
            os.fsync(handle.fileno())
        digest = hashlib.file_digest(handle, "sha256")
        return handle.tell(), digest.hexdigest()


# ------------------------------------------------------------------------------------------------ checking
def verify_checkpoint(path: str | Path) -> None:
    """Check every file of the checkpoint against its manifest; raise `CheckpointError` on the first that differs."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: expected the checkpoint's manifest (each file's size and sha256), "
                              "found nothing there (damaged, or written by a Köprü that kept no manifest)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{manifest_path}: expected JSON listing the checkpoint's files, found unreadable "
                              f"content ({type(error).__name__}: {_one_line(error)})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_path}: expected {{'format': {MANIFEST_FORMAT!r}, 'files': {{...}}}}, "
                              f"found {_one_line(manifest, 100)}")
    for name in CHECKPOINT_FILES:
        entry = files.get(name)
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{manifest_path}: expected an entry {{'bytes', 'sha256'}} for {name}, found "
                                  f"{_one_line(entry, 100)}")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: expected a file of {entry['bytes']:,} bytes, found nothing there")
        try:
            size, digest = _digest(file)
        except OSError as error:
            raise CheckpointError(f"{file}: expected a readable file, found {_one_line(error)}") from None
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "grown since it was written"
            raise CheckpointError(f"{file}: expected {entry['bytes']:,} bytes, found {size:,} ({what})")
        if digest != entry["sha256"]:
            raise CheckpointError(f"{file}: expected sha256 {entry['sha256']}, found {digest} (same size, changed "
                                  "content: corrupted on disk or edited)")


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The folder `directory/latest` names, when it is a checkpoint folder of `directory` that exists (unchecked)."""
    name, _ = _latest_name(Path(directory))
    return Path(directory) / name if name is not None and (Path(directory) / name).is_dir() else None


def _latest_name(directory: Path) -> tuple[str | None, str | None]:
    """(the checkpoint name `latest` holds, or None; why it was not taken, or None)."""
    pointer = directory / LATEST
    if not pointer.exists():
        return None, None
    try:
        text = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{pointer}: expected the name of a checkpoint folder, found unreadable content ({_one_line(error)})"
    if not _CHECKPOINT_NAME.fullmatch(text):
        outside = "/" in text or "\\" in text or ".." in text
        where = "outside the output folder; not followed" if outside else "ignored"
        return None, (f"{pointer}: expected the name of a checkpoint-N folder inside {directory}, found "
                      f"{_one_line(repr(text), 100)} ({where})")
    target = directory / text
    if target.is_symlink():
        return None, f"{target}: expected a checkpoint folder inside {directory}, found a link (not followed)"
    return text, None


def checkpoint_folders(directory: str | Path) -> list[Path]:
    """The `checkpoint-N` folders directly inside `directory` (links not followed), newest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True)


def resume_checkpoint(directory: str | Path, log: Log = print) -> Path | None:
    """The checkpoint to resume from: the one `latest` names when it is intact, otherwise the newest intact
    `checkpoint-N` of `directory`; each one passed over is logged with its reason. None when `directory` holds
    no checkpoint at all; `CheckpointError` when it holds some and none is intact."""
    directory = Path(directory)
    name, problem = _latest_name(directory)
    rejected = []
    if problem:
        rejected.append(problem)
    elif name is not None and not (directory / name).is_dir():
        rejected.append(f"{directory / LATEST}: expected the folder it names, {directory / name}, found nothing there")
    folders = checkpoint_folders(directory)
    if name is not None and (directory / name) in folders:
        folders.remove(directory / name)
        folders.insert(0, directory / name)
    for message in rejected:
        log(message)
    for folder in folders:
        try:
            verify_checkpoint(folder)
        except CheckpointError as error:
            rejected.append(str(error))
            log(str(error))
            continue
        if rejected:
            log(f"resuming from {folder}, the newest intact checkpoint ({len(rejected)} problem(s) above)")
        return folder
    if not folders and name is None and not problem:
        return None
    raise CheckpointError(f"no intact checkpoint under {directory}: " + "; ".join(rejected or ["none found"]))


def remove_partial_saves(directory: str | Path, log: Log = print) -> list[str]:
    """Remove what a killed save or rotation left in `directory` (see `_PARTIAL_NAME`); return the names."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if not _PARTIAL_NAME.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
        log(f"removed {entry}, left by an interrupted checkpoint save")
    return removed


def rotate_checkpoints(directory: str | Path, keep_last: int, log: Log | None = None) -> list[str]:
    """Delete all but the newest `keep_last` checkpoint folders, never the one `latest` names; return their names.

    Each is first renamed to `.checkpoint-N.deleting` (one atomic step), so a kill during the deletion leaves a
    partial folder that `remove_partial_saves` clears, never a damaged `checkpoint-N`."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, found {keep_last}")
    directory = Path(directory)
    protected, _ = _latest_name(directory)
    deleted = []
    for folder in checkpoint_folders(directory)[keep_last:]:
        if folder.name == protected:
            continue
        doomed = directory / f".{folder.name}.deleting"
        if doomed.exists():
            shutil.rmtree(doomed)
        folder.rename(doomed)
        shutil.rmtree(doomed)
        deleted.append(folder.name)
        if log is not None:
            log(f"removed {folder} (--keep-last {keep_last})")
    return deleted


# ------------------------------------------------------------------------------------------------- loading
def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    verify: bool = True,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; return the trainer state (step, data position, ...).

    `verify`: check the files against the manifest first (`verify_checkpoint`); False when the caller just did.
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
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


def _one_line(value: Any, limit: int = 160) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _to_json(value: Any) -> Any:
    return [_to_json(v) for v in value] if isinstance(value, tuple | list) else value


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value
