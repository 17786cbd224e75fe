"""Can a tool write where it was told to? Checked before the work starts, not after hours of it.

An `--out` under a regular file, on a read-only mount, or without permission used to surface as a traceback at
the very end (tools/evaluate.py made its report folder after every feature was computed). `check_writable`
finds out at once, without creating anything: it probes the folder, or its nearest existing parent, with a
temporary file that is removed straight away. The OSError it raises names the path and the cause
(diffusion/errors.py: `describe_error`), so every entry point prints one line.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def check_writable(folder: str | Path, flag: str | None = None) -> None:
    """Raise OSError (naming `flag` and `folder`, with errno's cause) unless files can be created in `folder`,
    or, while it does not exist yet, in its nearest existing parent (where it would be made)."""
    path = Path(folder).expanduser()
    name = f"{flag} {path}" if flag else str(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():  # the folder, or a component of its path, is a regular file
        code = errno.EEXIST if probe == path else errno.ENOTDIR
        raise OSError(code, os.strerror(code), name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-check-", dir=probe)
    except OSError as err:
        raise OSError(err.errno, err.strerror, name) from None
    os.close(fd)
    os.unlink(tmp)
