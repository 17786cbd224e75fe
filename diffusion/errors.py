"""How a command ends on bad input or a failed environment: the exceptions every entry point (tools and
trainers alike) turns into one `error: ...` line, and how an operating-system error reads in that line.

A user who points `--out` at a read-only mount, or under a regular file, or fills the disk, gets the path and
the cause, never a traceback from deep inside h5py, PIL or torch.save.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

# What an entry point reports as one line (exit status 2). KeyError: a missing dataset key or config entry.
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError, KeyError)

OS_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a component of the path is a regular file, not a folder",
    errno.EISDIR: "is a folder, expected a file",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "is a regular file where a folder is expected",
}
# What a failed write raises: torch.save RuntimeError, safetensors SafetensorError, h5py and PIL OSError. Other
# exceptions (a ValueError of the caller's) pass through untouched, even on a nearly full disk.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# Below this many free bytes a failed write is taken as a full disk (torch.save, safetensors and h5py report it
# without errno 28: "enforce fail at inline_container.cc ... unexpected pos", "I/O error", "Can't write data").
FULL_DISK_BYTES = 1 << 20


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding `path` (its nearest existing parent); None when unknown."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def describe_error(err: BaseException) -> str:
    """The text after `error: ` for an exception in USER_ERRORS."""
    if isinstance(err, KeyError):
        return str(err.args[0]) if err.args else "missing key"
    if isinstance(err, OSError) and err.errno in OS_CAUSES:
        where = err.filename if err.filename is not None else "output"
        line = f"{where}: {OS_CAUSES[err.errno]}"
        if err.errno == errno.ENOSPC:
            free = free_bytes(where)
            if free is not None:
                line += f" ({_mib(free)} free there"
                needed = getattr(err, "needed_bytes", None)
                line += f", about {_mib(needed)} needed)" if needed else ")"
        return line
    return str(err)


@contextlib.contextmanager
def named_write_errors(path: str | Path, needed_bytes: int | None = None) -> Iterator[None]:
    """Re-raise a failed write under `path` as an OSError that names `path` and its cause.

    A full disk becomes errno ENOSPC (with the free space and, when known, `needed_bytes`) whatever library
    raised it; an OSError without a file name gets `path`. Other errors pass through unchanged.
    """
    try:
        yield
    except WRITE_ERRORS as err:
        code = getattr(err, "errno", None)
        free = free_bytes(path)
        if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < FULL_DISK_BYTES):
            full = OSError(
                code if code == errno.EDQUOT else errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)
            )
            full.needed_bytes = needed_bytes  # type: ignore[attr-defined]
            raise full from err
        if isinstance(err, OSError) and err.filename is None and code is not None:
            raise OSError(code, err.strerror, str(path)) from err
        raise
