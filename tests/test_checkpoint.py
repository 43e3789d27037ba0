"""Checkpoints you can trust: each file's size and sha256 in the manifest, damage named in one line, the newest
intact checkpoint taken, `latest` kept inside the output folder, partial saves cleared, rotation that never
deletes what `latest` names. A two-parameter model is enough: the files and their checks do not depend on size."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import flip_bit, truncate
from torch import nn

import kopru.training.checkpoint
from kopru.training.checkpoint import (
    CHECKPOINT_FILES,
    LATEST,
    MANIFEST,
    CheckpointError,
    checkpoint_folders,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_saves,
    resume_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)


def _training_objects(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def _save_steps(directory: Path, steps: list[int], keep_last: int | None = None, log=None) -> nn.Module:
    """Train a step and save after each of `steps`; return the model (its weights are those of the last save)."""
    model, optimizer, scheduler = _training_objects()
    for step in steps:
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        save_checkpoint(directory, model, optimizer, scheduler, {"step": step, "losses": [0.5] * step},
                        keep_last=keep_last, log=log)
    return model


@pytest.fixture
def run(tmp_path: Path) -> Path:
    _save_steps(tmp_path / "run", [2, 4])
    return tmp_path / "run"


def test_manifest_records_each_files_size_and_sha256(run: Path) -> None:
    manifest = json.loads((run / "checkpoint-4" / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(CHECKPOINT_FILES)
    for name, entry in manifest["files"].items():
        data = (run / "checkpoint-4" / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    verify_checkpoint(run / "checkpoint-4")


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
@pytest.mark.parametrize(("damage", "expected"), [
    (truncate, r"expected [\d,]+ bytes, found [\d,]+ \(truncated\)"),
    (flip_bit, r"expected sha256 [0-9a-f]{64}, found [0-9a-f]{64}"),
    (Path.unlink, r"expected a file of [\d,]+ bytes, found nothing there"),
], ids=["truncated", "flipped-bit", "missing"])
def test_damage_is_one_line_naming_the_file(run: Path, name: str, damage, expected: str) -> None:
    file = run / "checkpoint-4" / name
    damage(file)
    with pytest.raises(CheckpointError, match=expected) as error:
        verify_checkpoint(run / "checkpoint-4")
    message = str(error.value)
    assert message.startswith(f"{file}: ") and "\n" not in message


def test_a_damaged_manifest_is_named(run: Path) -> None:
    manifest = run / "checkpoint-4" / MANIFEST
    truncate(manifest)
    with pytest.raises(CheckpointError, match=rf"^{manifest}: expected JSON listing the checkpoint's files"):
        verify_checkpoint(run / "checkpoint-4")
    manifest.unlink()
    with pytest.raises(CheckpointError, match=rf"^{manifest}: expected the checkpoint's manifest"):
        verify_checkpoint(run / "checkpoint-4")


def test_load_checks_the_files_first(run: Path) -> None:
    flip_bit(run / "checkpoint-4" / "trainable.safetensors")
    model, optimizer, scheduler = _training_objects(seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match="trainable.safetensors: expected sha256"):
        load_checkpoint(run / "checkpoint-4", model, optimizer, scheduler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing loaded


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    _save_steps(tmp_path / "run", [1, 2, 3])
    run = tmp_path / "run"
    truncate(run / "checkpoint-3" / "optimizer.safetensors")
    lines: list[str] = []
    assert resume_checkpoint(run, lines.append) == run / "checkpoint-2"
    assert len(lines) == 2
    assert lines[0].startswith(f"{run / 'checkpoint-3' / 'optimizer.safetensors'}: expected ")
    assert lines[1] == f"resuming from {run / 'checkpoint-2'}, the newest intact checkpoint (1 problem(s) above)"
    # An intact `latest` is taken without a word.
    (run / LATEST).write_text("checkpoint-1\n")
    quiet: list[str] = []
    assert resume_checkpoint(run, quiet.append) == run / "checkpoint-1" and quiet == []


def test_no_intact_checkpoint_lists_every_reason(run: Path) -> None:
    truncate(run / "checkpoint-4" / "rng.safetensors")
    (run / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint under .*checkpoint-4/rng.safetensors: "
                                              r"expected .*; .*checkpoint-2/trainer_state.json: expected"):
        resume_checkpoint(run, lambda line: None)
    assert resume_checkpoint(run.parent / "empty", lambda line: None) is None


@pytest.mark.parametrize("pointer", ["../elsewhere/checkpoint-20", "/tmp/checkpoint-20", "checkpoint-20/..",
                                     "link"])
def test_latest_never_leads_outside_the_output_folder(run: Path, pointer: str) -> None:
    outside = run.parent / "elsewhere" / "checkpoint-20"
    shutil.copytree(run / "checkpoint-2", outside)  # intact: only where it lies is wrong
    link = pointer == "link"
    if link:
        (run / "checkpoint-20").symlink_to(outside, target_is_directory=True)
        pointer = "checkpoint-20"
    (run / LATEST).write_text(pointer + "\n")
    assert latest_checkpoint(run) is None
    lines: list[str] = []
    assert resume_checkpoint(run, lines.append) == run / "checkpoint-4"
    assert lines[0].endswith("found a link (not followed)" if link else
                             f"found {pointer!r} (outside the output folder; not followed)")
    assert lines[1].startswith(f"resuming from {run / 'checkpoint-4'}")


def test_latest_naming_a_missing_checkpoint_falls_back(run: Path) -> None:
    (run / LATEST).write_text("checkpoint-6\n")
    lines: list[str] = []
    assert resume_checkpoint(run, lines.append) == run / "checkpoint-4"
    assert lines[0] == f"{run / LATEST}: expected the folder it names, {run / 'checkpoint-6'}, found nothing there"


def test_rotation_keeps_the_newest_and_never_what_latest_names(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save_steps(run, [1, 2, 3, 4, 5], keep_last=2)
    assert [p.name for p in checkpoint_folders(run)] == ["checkpoint-5", "checkpoint-4"]
    _save_steps(run, [1, 2, 3])  # a run resumed from an earlier step: `latest` names checkpoint-3, not the newest
    assert latest_checkpoint(run) == run / "checkpoint-3"
    removed: list[str] = []
    assert rotate_checkpoints(run, 1, removed.append) == ["checkpoint-4", "checkpoint-2", "checkpoint-1"]
    assert [p.name for p in checkpoint_folders(run)] == ["checkpoint-5", "checkpoint-3"]
    assert removed[0] == f"removed {run / 'checkpoint-4'} (--keep-last 1)"


def test_partial_saves_left_by_a_kill_are_removed(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A kill inside the atomic write: no cleanup runs, the staging folder stays (rmtree stands in for the kill).
    with monkeypatch.context() as patch:
        patch.setattr(kopru.training.checkpoint.shutil, "rmtree", lambda *args, **kwargs: None)

        def killed(*args, **kwargs):
            raise KeyboardInterrupt

        patch.setattr(kopru.training.checkpoint, "save_file", killed)
        with pytest.raises(KeyboardInterrupt):
            _save_steps(run, [6])
    (run / ".checkpoint-2.deleting").mkdir()  # a kill during rotation
    (run / ".latest.tmp").write_text("checkpoint-6\n")
    (run / ".notes").write_text("mine")  # not Köprü's: left alone
    left = sorted(p.name for p in run.iterdir() if p.name.startswith(".checkpoint-6."))
    assert len(left) == 1
    lines: list[str] = []
    removed = remove_partial_saves(run, lines.append)
    assert sorted(removed) == sorted([*left, ".checkpoint-2.deleting", ".latest.tmp"])
    assert sorted(p.name for p in run.iterdir()) == [".notes", "checkpoint-2", "checkpoint-4", "latest"]
    assert lines[0].startswith("removed ") and lines[0].endswith(", left by an interrupted checkpoint save")
