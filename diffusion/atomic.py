"""Atomic writes: everything we write goes to a temporary name in the same folder, then is renamed.

A crash or kill mid-write leaves the previous file (or nothing) in place, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import named_write_errors


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (file or folder) atomically.

    A write that fails for want of space or permission is re-raised naming `path` (`named_write_errors`)."""
    path = Path(path)
    with named_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        with named_write_errors(path):
            yield tmp
        if path.is_dir() and tmp.is_dir():  # folders cannot be renamed over: swap through a trash name
            trash = path.with_name(f".{path.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(path, trash)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
