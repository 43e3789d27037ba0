"""Telling a local checkpoint path from a hub id, so a mistyped path fails with a clear message."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def looks_local(name_or_path: str) -> bool:
    """A hub id is "name" or "org/name"; anything else can only be a local path."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or Path(name_or_path).exists()


def check_exists(name_or_path: str, what: str) -> None:
    """Raise FileNotFoundError when `name_or_path` can only be a local path and nothing is there."""
    if not looks_local(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} path {name_or_path!r} does not exist")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"expected a Hugging Face {what} checkpoint (config.json) in {name_or_path!r}, found none")


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` to write into; on success it replaces `path` in one rename, on failure it
    is removed, so a killed or failed write never leaves a half-written `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # the umask's usual folder mode (mkdtemp would make it 0700, unreadable to others)
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
