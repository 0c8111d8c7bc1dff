"""Files replaced whole, and fsync: the one place dreamd makes a write atomic or durable.

`write_atomic` writes a temp file beside the target and renames it over the target (os.replace
is atomic on POSIX): a reader sees the old content or the new one, never a half-written file.
With `durable=True` the temp file is fsynced before the rename and the directory after it, so
the new name survives a power loss too (the pause flag); the live status file, rewritten at
every optimizer step and worthless after a crash, skips the fsyncs. Checkpoints are whole
directories made durable with `fsync_tree` (train/checkpoint.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (its entries: names created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, so names and contents are durable."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace `path` with `text` in one step (see the module docstring for `durable`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
