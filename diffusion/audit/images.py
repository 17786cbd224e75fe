"""The image sets an audit compares: an image folder, or the crops of a dataset index's patches.

An `ImageSet` lists entries (a file, or a crop of a patch file), their keys, and the slide each comes from when
that is known: a dataset patch's slide is its folder (`<dataset>/<cancer>/single_<size>/<slide>/`); a generated
image's slide is that of the patch it was conditioned on, read from the sampling run's `manifest.jsonl`
(tools/sample.py writes it beside `syn/` and `real/`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffusion.data.index import index_lengths, key_size, read_index, resolve_keys
from diffusion.geometry import UNI_TILE
from diffusion.metrics.images import content_hash, list_images, read_rgb
from diffusion.sampling.conditions import crop_names


@dataclass(frozen=True)
class Crop:
    """A square crop of an image file: `size` px at (y, x)."""

    path: Path
    y: int
    x: int
    size: int


@dataclass(frozen=True)
class ImageSet:
    """Images to embed and compare: `files[i]` (a Path or a Crop) has key `keys[i]`, slide `slides[i]`."""

    role: str
    root: Path
    keys: tuple[str, ...]
    files: tuple
    slides: tuple[str | None, ...]
    fingerprint: str  # content identity, for the feature cache

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, entry: Path | Crop) -> np.ndarray:
        """(H, W, 3) uint8 of one entry; a ValueError naming the file when it cannot be read."""
        if isinstance(entry, Crop):
            image = read_rgb(entry.path)
            if min(image.shape[:2]) < max(entry.y, entry.x) + entry.size:
                raise ValueError(
                    f"{entry.path}: {image.shape[0]}x{image.shape[1]} px, too small for its crops"
                )
            return np.ascontiguousarray(image[entry.y : entry.y + entry.size, entry.x : entry.x + entry.size])
        return read_rgb(entry)

    def image(self, i: int) -> np.ndarray:
        return self.read(self.files[i])


def is_index(path: str | Path) -> bool:
    return Path(path).suffix in (".hdf5", ".h5")


def from_folder(path: str | Path, role: str, progress: bool = True) -> ImageSet:
    """Every image under a folder; slides from a sampling manifest in it or beside it, when there is one."""
    folder = list_images(path, role)
    slides = _manifest_slides(folder.root)
    return ImageSet(
        role=role,
        root=folder.root,
        keys=folder.keys,
        files=folder.files,
        slides=tuple(slides.get(f.resolve()) for f in folder.files),
        fingerprint=content_hash(folder, progress),
    )


def from_index(
    index_file: str | Path,
    role: str,
    size: int,
    keys: Sequence[str] | None = None,
    data_root: str | Path | None = None,
) -> ImageSet:
    """The `size` px crops of every patch under the index's `keys` (all by default), one entry per crop.

    The fingerprint covers each patch's path, byte size and modification time (reading 30M files to hash them
    would cost as much as embedding them).
    """
    index_file = Path(index_file)
    if not index_file.is_file():
        raise FileNotFoundError(f"{role} {index_file}: no such index file")
    try:
        lengths = index_lengths(index_file)
    except OSError as err:
        raise ValueError(f"{role} {index_file}: not a readable HDF5 index ({err})") from None
    root = Path(data_root) if data_root else index_file.parent.parent
    names, files, slides = [], [], []
    h = hashlib.blake2b(digest_size=16)
    for key, patches in read_index(index_file, resolve_keys(lengths, keys, index_file)).items():
        side = key_size(key)
        if side % size:
            raise ValueError(
                f"{role} {index_file}: {key} holds {side} px patches, not a multiple of {size} px"
            )
        m = size // UNI_TILE if size >= UNI_TILE else 1
        tile = size // m
        for rel in tqdm(patches, desc=f"listing {role}", leave=False, disable=len(patches) < 10_000):
            path = root / rel
            try:
                st = path.stat()
            except FileNotFoundError:
                raise FileNotFoundError(f"{role} {index_file}: patch {path} is missing") from None
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            stem = str(Path(rel).with_suffix("").as_posix())
            for name, y, x in crop_names(stem, (side // tile, side // tile), m, tile):
                names.append(name)
                files.append(Crop(path, y * tile, x * tile, size))
                slides.append(Path(rel).parent.as_posix())
    if not names:
        raise ValueError(f"{role} {index_file}: no patches under the chosen keys")
    h.update(str(size).encode())
    return ImageSet(role, root, tuple(names), tuple(files), tuple(slides), h.hexdigest())


def _manifest_slides(folder: Path) -> dict[Path, str]:
    """{image file: slide of the patch it was conditioned on} from `manifest.jsonl` in `folder` or its parent."""
    for run_dir in (folder, folder.parent):
        manifest = run_dir / "manifest.jsonl"
        if not manifest.is_file():
            continue
        out = {}
        for line in manifest.read_text().splitlines():
            row = json.loads(line)
            patch = (row.get("source") or {}).get("patch")
            if not patch:
                continue
            for col in ("syn", "real"):
                if row.get(col):
                    out[(run_dir / row[col]).resolve()] = Path(patch).parent.as_posix()
        return out
    return {}
