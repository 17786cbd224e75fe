"""The patch index: `patches/metadata/patch_names_all.hdf5`, one string dataset per `<dataset>_<size>`.

Each entry is a patch path relative to the patches root, e.g. `tcga_diagnostic/lihc/single_1024/TCGA-BC-A8YO/82_17.jpeg`
(the published format: the original training code reads it unchanged). Order is deterministic: by group, slide,
then row and column as numbers, so two scans of the same tree give the same file, byte for byte in content.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from diffusion.atomic import atomic_path

log = logging.getLogger("pixcell.data")

INDEX_RELPATH = Path("metadata") / "patch_names_all.hdf5"
PATCH_NAME = re.compile(r"^(\d+)_(\d+)\.(png|jpe?g|tiff?|webp)$", re.IGNORECASE)
SIZE_DIR = re.compile(r"^single_(\d+)$")
KEY = re.compile(r"^(.+)_(\d+)$")


def default_index_file(root: str | Path) -> Path:
    return Path(root) / INDEX_RELPATH


def patch_sort_key(rel: str) -> tuple:
    """(dataset, group, size dir, slide, row, col): rows and columns compare as numbers, not text."""
    parts = rel.split("/")
    m = PATCH_NAME.match(parts[-1])
    rc = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    return (*parts[:-1], *rc, parts[-1])


def key_size(key: str) -> int:
    """`tcga_diagnostic_1024` -> 1024 (the parent patch size the key holds)."""
    m = KEY.match(key)
    if m is None:
        raise ValueError(f"index key {key!r}: expected <dataset>_<size>, e.g. tcga_diagnostic_1024")
    return int(m.group(2))


def _subdirs(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted((e for e in it if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)


def scan_patches(
    root: str | Path, sizes: Iterable[int] | None = None, datasets: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """Walk `root/<dataset>/<group>/single_<size>/<slide>/<row>_<col>.<ext>` -> {`<dataset>_<size>`: [rel paths]}.

    Slide folders that our extractor started but did not finish (a `.params.json` without `summary.json`) are
    left out with a warning: they would change when the extraction is resumed.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"patches root {root}: no such folder")
    sizes = set(sizes) if sizes is not None else None
    datasets = set(datasets) if datasets is not None else None
    out: dict[str, list[str]] = {}
    unfinished = []
    for ds in _subdirs(root):
        if ds.name == "metadata" or (datasets is not None and ds.name not in datasets):
            continue
        for group in _subdirs(Path(ds.path)):
            for size_dir in _subdirs(Path(group.path)):
                m = SIZE_DIR.match(size_dir.name)
                if m is None or (sizes is not None and int(m.group(1)) not in sizes):
                    continue
                key = f"{ds.name}_{m.group(1)}"
                for slide in _subdirs(Path(size_dir.path)):
                    slide_path = Path(slide.path)
                    if (slide_path / ".params.json").is_file() and not (
                        slide_path / "summary.json"
                    ).is_file():
                        unfinished.append(slide_path)
                        continue
                    prefix = f"{ds.name}/{group.name}/{size_dir.name}/{slide.name}/"
                    with os.scandir(slide_path) as it:
                        names = [e.name for e in it if e.is_file() and PATCH_NAME.match(e.name)]
                    out.setdefault(key, []).extend(prefix + n for n in names)
    for folder in unfinished:
        log.warning("not indexed (extraction not finished; re-run extract_patches): %s", folder)
    return {k: sorted(v, key=patch_sort_key) for k, v in sorted(out.items())}


def write_index(path: str | Path, index: dict[str, list[str]]) -> Path:
    """Write {key: [rel paths]} as one variable-length UTF-8 string dataset per key (atomically)."""
    path = Path(path)
    for key in index:
        key_size(key)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            for key, names in sorted(index.items()):
                h5.create_dataset(key, data=np.array(names, dtype=object), dtype=h5py.string_dtype("utf-8"))
    return path


def _open(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index {path}: no such file (build it with `python -m tools.build_index`)")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"index {path}: not a readable HDF5 file ({err})") from None


def resolve_keys(
    available: Iterable[str], keys: Iterable[str] | None, path: str | Path = "index"
) -> list[str]:
    """Check requested keys against the index; `tcga` also matches `tcga_<size>` when that is unique."""
    available = list(available)
    if keys is None:
        return available
    out = []
    for key in keys:
        if key in available:
            out.append(key)
            continue
        matches = [a for a in available if KEY.match(a) and KEY.match(a).group(1) == key]
        if len(matches) != 1:
            raise KeyError(f"{path}: no dataset key {key!r} (available: {', '.join(available) or 'none'})")
        out.append(matches[0])
    return out


def index_lengths(path: str | Path) -> dict[str, int]:
    with _open(path) as h5:
        return {k: len(h5[k]) for k in h5.keys()}


def read_index(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Read {key: [rel paths]}; a key that is not in the file raises KeyError naming the available ones."""
    with _open(path) as h5:
        wanted = resolve_keys(h5.keys(), keys, path)
        return {k: [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in h5[k][()]] for k in wanted}


def merge_indexes(indexes: Iterable[dict[str, list[str]]]) -> dict[str, list[str]]:
    """Union of several indexes, per key; a path listed twice is kept once; order re-sorted deterministically."""
    merged: dict[str, set[str]] = {}
    for index in indexes:
        for key, names in index.items():
            merged.setdefault(key, set()).update(names)
    return {k: sorted(v, key=patch_sort_key) for k, v in sorted(merged.items())}
