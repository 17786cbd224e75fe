"""One run per folder: an exclusive lock on a training work dir or a sampling output folder.

Two jobs started on one work dir (a double-submitted SLURM job) used to train side by side, delete each other's
temporary checkpoint folders and interleave their logs. Now the second one stops at once with one line naming
the holder.

The lock is `fcntl.flock` on `<folder>/.lock`: the kernel releases it when the holding process dies, however it
dies, so a crashed or killed run never leaves the folder locked (the file stays; its contents only say who held
it last). On Linux, flock on NFS is emulated with POSIX byte-range locks, which NFS servers arbitrate across
hosts. In a multi-process job only one process (the main one of the whole job) takes the lock: its processes
share the folder by design.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
# The locks this process holds, by folder: a run in this process that ended without releasing its lock (an
# exception in a test that runs trainers in-process) is superseded by the next run on the same folder here.
_HELD: dict[Path, FolderLock] = {}


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """Hold `<folder>/.lock` exclusively until `release()` (or the end of the process).

    >>> with FolderLock(work_dir, what="work dir"):
    ...     train()
    """

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder = Path(folder)
        self.what = what
        self._fh = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        if key in _HELD:  # this process's own earlier run on the folder
            _HELD[key].release()
        path = self.folder / LOCK_NAME
        fh = open(path, "a+")  # never truncates: a loser must not erase the holder's note
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _describe(fh.read())
            fh.close()
            raise FolderInUse(
                f"{self.folder}: this {self.what} is in use by another run ({holder}); wait for it to finish, "
                f"stop it, or use another {self.what}"
            ) from None
        fh.seek(0)
        fh.truncate()
        note = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        fh.write(json.dumps(note))
        fh.flush()
        self._fh = fh
        _HELD[key] = self
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
            _HELD.pop(self.folder.resolve(), None)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def release_held() -> None:
    """Release every lock this process holds (the end of a run's entry point)."""
    for lock in list(_HELD.values()):
        lock.release()


def _describe(text: str) -> str:
    try:
        note = json.loads(text)
        return f"host {note['host']}, PID {note['pid']}, started {note['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
