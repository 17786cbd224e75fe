"""Row-addressed arrays on disk: a `.npy` file read and written by row ranges with `pread`/`pwrite`.

Whole-slide generation keeps its latents, step outputs and pixels on disk and touches them one band of rows at
a time. A memory map would do the same I/O, but its touched pages count in the process's resident set (RSS) until
it is unmapped, so the peak RSS of a 32,768^2 px run would grow with the slide; plain reads and writes keep only
the band in memory. Rows are the first axis of a C-ordered array, so a band of rows is one contiguous byte range.
The files are ordinary `.npy` files: `np.load(path, mmap_mode="r")` opens them for inspection.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class DiskArray:
    """A C-ordered `.npy` file of `shape` and `dtype` on disk; `read(a, b)` / `write(a, block)` move rows a..b."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: str | np.dtype = "float32"):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if not self._valid():
            self._create()
        with open(self.path, "rb") as fh:
            np.lib.format.read_magic(fh)
            np.lib.format.read_array_header_1_0(fh)
            self.offset = fh.tell()

    def _valid(self) -> bool:
        """An existing file of this shape and dtype (a rerun reuses it); anything else is replaced."""
        if not self.path.is_file():
            return False
        try:
            with open(self.path, "rb") as fh:
                np.lib.format.read_magic(fh)
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                size = fh.tell() + self.row_bytes * self.shape[0]
        except (ValueError, OSError):
            return False
        return (
            shape == self.shape and not fortran and dtype == self.dtype and self.path.stat().st_size == size
        )

    def _create(self) -> None:
        # A sparse file of the full size: the header, then zeros that take no disk until written. Created under
        # a temporary name and renamed, so a kill leaves no half-made header.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": self.shape,
        }
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            fh.truncate(fh.tell() + self.row_bytes * self.shape[0])
        os.replace(tmp, self.path)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop (clipped to the array) as a new in-memory array."""
        start, stop = max(0, start), min(self.shape[0], stop)
        n = max(0, stop - start)
        with open(self.path, "rb") as fh:
            data = os.pread(fh.fileno(), n * self.row_bytes, self.offset + start * self.row_bytes)
        if len(data) != n * self.row_bytes:
            raise OSError(f"{self.path}: truncated (rows {start}..{stop} not all there)")
        return np.frombuffer(data, self.dtype).reshape(n, *self.shape[1:]).copy()

    def write(self, start: int, block: np.ndarray) -> None:
        """Rows start..start+len(block) from `block` (same trailing shape), written in place."""
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or start < 0 or start + block.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path}: rows {start}+{block.shape} do not fit an array of {self.shape}")
        with open(self.path, "r+b") as fh:
            os.pwrite(fh.fileno(), block.tobytes(), self.offset + start * self.row_bytes)
            fh.flush()
            os.fsync(fh.fileno())
