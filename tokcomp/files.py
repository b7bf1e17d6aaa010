"""Files written whole: a reader, or a run started again, never sees half of one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def blocking_file(path: Path) -> Path | None:
    """The file standing where a folder of `path` should be (so `path` cannot be written),
    or None."""
    nearest = next(parent for parent in path.absolute().parents if parent.exists())
    return None if nearest.is_dir() else nearest


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A partial file beside `path` for the block to write; when the block ends without an
    error it replaces `path` in one step, and otherwise `path` stays as it was (the partial
    file is removed either way)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_whole(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path`, written whole, its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as partial:
        partial.write_text(text, encoding="utf-8")


def torch_save_whole(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path`, written whole."""
    with written_whole(path) as partial:
        torch.save(obj, partial)
