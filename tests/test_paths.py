"""kopru.paths.atomic_directory: the written folder appears whole or not at all, with a folder's usual mode."""

from __future__ import annotations

import os

import pytest

from kopru.paths import atomic_directory


def test_the_folder_gets_the_umask_mode_not_mkdtemps_0700(tmp_path):
    """A saved model or checkpoint must be readable by whoever may read the output folder (mkdtemp made 0700)."""
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "model") as staging:
            (staging / "weights").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "model" / "weights").read_text() == "x"
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_a_failed_write_leaves_the_old_folder_and_no_staging(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "model") as staging:
        (staging / "new").write_text("half")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (tmp_path / "model" / "old").read_text() == "kept"
