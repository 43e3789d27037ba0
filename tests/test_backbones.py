"""kopru.backbones: where the built-in default backbones are, and a plain error naming `kopru pretrain-tiny` when
they are missing (the library never builds them itself)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import kopru.backbones as backbones
from kopru.backbones import ASSETS_DIR, BACKBONE_FILES, default_backbones, missing_backbone_files
from kopru.lesson.pretrain_tiny import pretrained_backbones
from kopru.training.loop import TrainConfig, build_model


def test_default_backbones_are_the_shipped_copy() -> None:
    paths = default_backbones()
    assert paths == {"vision": ASSETS_DIR / "vision", "llm": ASSETS_DIR / "llm"}
    for role, names in BACKBONE_FILES.items():
        assert all((paths[role] / name).is_file() for name in names), role
    assert pretrained_backbones(seed=0) == paths  # the lesson's seed 0 is the library's default, not a copy


def _incomplete_copy(root: Path) -> Path:
    """The shipped backbones without the LLM's weights and the vision preprocessor config."""
    shutil.copytree(ASSETS_DIR, root)
    (root / "llm" / "model.safetensors").unlink()
    (root / "vision" / "preprocessor_config.json").unlink()
    return root


def test_missing_files_are_named(tmp_path: Path) -> None:
    root = _incomplete_copy(tmp_path / "tiny")
    assert missing_backbone_files(root) == [root / "vision" / "preprocessor_config.json",
                                            root / "llm" / "model.safetensors"]
    assert missing_backbone_files(ASSETS_DIR) == []
    assert len(missing_backbone_files(tmp_path / "nothing")) == sum(map(len, BACKBONE_FILES.values()))


def test_without_the_shipped_copy_training_says_how_to_build_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent minutes of pretraining inside the library: one error naming what is missing and the command."""
    monkeypatch.setattr(backbones, "ASSETS_DIR", _incomplete_copy(tmp_path / "tiny"))
    for call in (default_backbones, lambda: build_model(TrainConfig())):
        with pytest.raises(FileNotFoundError) as caught:
            call()
        message = str(caught.value)
        assert "vision/preprocessor_config.json, llm/model.safetensors missing" in message, message
        assert "kopru pretrain-tiny --out DIR" in message and "--vision DIR/vision --llm DIR/llm" in message
