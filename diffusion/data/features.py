"""Where the per-patch features live on disk, in two interchangeable formats.

**npy** (the published layout; features made by the original code load here and ours load there):
`<features_root>/<patch path without extension>_sd3_vae.npy`, float16 (2*16, S/8, S/8) = VAE posterior mean and std
stacked on channels, and `..._uni.npy`, float16 (T, C) = one UNI2-h embedding per 256 px tile, row-major
(T = (S/256)^2, C = 1536). `features_root` defaults to the patches root (features beside the images, as in the
published README); the original `extract_features.py` wrote them under `<data>/features/` instead: pass that folder.
`<features_root>/features_meta.json` records the encoders and the VAE's latent normalisation (`vae_shift`,
`vae_scale`, see diffusion/geometry.py); features made before it existed (or by the original code) have none.

**packed** (for tens of millions of patches): per index key, one HDF5 file per `shard_size` consecutive patches of
the index, `<packed_root>/<key>/<shard:06d>.h5`, holding
    vae   (n, 32, S/8, S/8) float16   contiguous, so a crop reads only its own bytes
    uni   (n, T, C)         float16
    paths (n,)              str        the index entries, checked against the index on read
    valid (n,)              bool       False where the patch failed extraction (logged there; skipped on read)
plus `<packed_root>/<key>/meta.json` (shapes, shard size, patch count, the encoders and the VAE's latent
normalisation). At 1024 px a shard of 1024 patches is
~1.1 GB; 30M patches fit in ~30k files instead of 60M. Each shard is written to a temporary name and renamed, so a
shard file that exists is complete.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import h5py
import numpy as np

from diffusion.atomic import atomic_path
from diffusion.geometry import UNI_TILE, VAE_FACTOR, recorded_norm

VAE_SUFFIX = "sd3_vae"
UNI_SUFFIX = "uni"
PACKED_DIRNAME = "features_packed"
PACKED_FORMAT = "pixcell-packed-features"
PACKED_VERSION = 1
DEFAULT_SHARD_SIZE = 1024
NPY_META_NAME = "features_meta.json"


class SampleError(ValueError):
    """One patch whose features cannot be used (missing, unreadable, wrong shape, NaN): skip and count it."""


#################################################################################
#                                  npy layout                                   #
#################################################################################


def npy_feature_paths(
    features_root: str | Path, rel_path: str, vae_suffix: str = VAE_SUFFIX, uni_suffix: str = UNI_SUFFIX
) -> tuple[Path, Path]:
    """`grp/single_1024/slide/3_4.png` -> (`<root>/grp/single_1024/slide/3_4_sd3_vae.npy`, `..._uni.npy`)."""
    stem = os.path.splitext(rel_path)[0]
    root = Path(features_root)
    return root / f"{stem}_{vae_suffix}.npy", root / f"{stem}_{uni_suffix}.npy"


def write_npy_meta(features_root: str | Path, meta: dict) -> Path:
    """Write (or check) `<features_root>/features_meta.json`: features of another normalisation are an error."""
    path = Path(features_root) / NPY_META_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        _check_norm(path, old, meta)
        meta = {**old, **meta}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    return path


def _check_norm(path: Path, old: dict, new: dict) -> None:
    """Features of two VAE normalisations in one folder would train on a mix: refuse."""
    a, b = recorded_norm(old), recorded_norm(new)
    if a is not None and b is not None and a != b:
        raise ValueError(
            f"{path}: the features there were made with a VAE of latent shift/scale {a}, this one has {b}; write "
            "to another folder or delete those features"
        )


def read_npy_meta(features_root: str | Path) -> dict:
    """`<features_root>/features_meta.json`, or {} for features written without it."""
    path = Path(features_root) / NPY_META_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary name (np.save on a path would append `.npy` to the temporary name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def load_npy(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Memory-map a feature `.npy` (so a crop reads only its bytes); SampleError when missing or malformed."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise SampleError(f"{path}: feature file missing") from None
    except (ValueError, OSError, EOFError) as err:  # zero-byte, truncated, not an .npy
        raise SampleError(f"{path}: unreadable .npy ({type(err).__name__}: {err})") from None
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise SampleError(f"{path}: shape {tuple(array.shape)}, expected {tuple(shape)}")
    if array.dtype.kind != "f":
        raise SampleError(f"{path}: dtype {array.dtype}, expected float16/float32")
    return array


#################################################################################
#                                  Work units                                   #
#################################################################################


@dataclass(frozen=True)
class WorkUnit:
    """`shard_size` consecutive patches of one index key: the unit of sharding, resuming and packing."""

    key: str
    shard: int  # shard number inside the key
    start: int  # first index position
    stop: int  # one past the last


def parse_shard(spec: str) -> tuple[int, int]:
    """`--shard i/n` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected i/n, e.g. 0/8") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: expected 0 <= i < n")
    return i, n


def work_units(lengths: dict[str, int], shard_size: int, job: tuple[int, int] = (0, 1)) -> list[WorkUnit]:
    """All units of the given keys (sorted by key), keeping every n-th one for job i of n."""
    if shard_size < 1:
        raise ValueError(f"shard size {shard_size}: expected >= 1")
    units = [
        WorkUnit(key, s, s * shard_size, min((s + 1) * shard_size, n))
        for key, n in sorted(lengths.items())
        for s in range((n + shard_size - 1) // shard_size)
    ]
    i, n = job
    return [u for k, u in enumerate(units) if k % n == i]


#################################################################################
#                                 Packed layout                                 #
#################################################################################


def packed_shard_path(packed_root: str | Path, key: str, shard: int) -> Path:
    return Path(packed_root) / key / f"{shard:06d}.h5"


def packed_meta_path(packed_root: str | Path, key: str) -> Path:
    return Path(packed_root) / key / "meta.json"


def write_packed_meta(
    packed_root: str | Path,
    key: str,
    num_patches: int,
    shard_size: int,
    vae_shape: tuple[int, ...],
    uni_shape: tuple[int, ...],
    extra: dict | None = None,
) -> Path:
    """Write (or check) `<key>/meta.json`. Every job writes the same content; a different one is an error."""
    meta = {
        "format": PACKED_FORMAT,
        "version": PACKED_VERSION,
        "key": key,
        "num_patches": int(num_patches),
        "shard_size": int(shard_size),
        "num_shards": (int(num_patches) + shard_size - 1) // shard_size,
        "vae_shape": list(vae_shape),
        "uni_shape": list(uni_shape),
        "dtype": "float16",
    }
    path = packed_meta_path(packed_root, key)
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        _check_norm(path, old, extra or {})
        if diff:
            raise ValueError(
                f"{path}: existing packed features differ {diff} (old, new); the index or the shard "
                "size changed: write to a new --packed-root or delete that folder"
            )
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**meta, **(extra or {})}, indent=1))
    return path


def read_packed_meta(packed_root: str | Path, key: str) -> dict:
    path = packed_meta_path(packed_root, key)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no packed features for {key!r} (run tools.extract_features --format "
            "packed or tools.pack_features)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != PACKED_FORMAT:
        raise ValueError(f"{path}: not a {PACKED_FORMAT} meta file")
    return meta


def recorded_latent_norm(
    features_root: str | Path, feature_format: str
) -> tuple[tuple[float, float] | None, str]:
    """The VAE latent normalisation (shift, scale) recorded beside extracted features, and the file that says so;
    (None, folder) for features that record none. Packed keys that disagree are a ValueError."""
    root = Path(features_root)
    if feature_format == "npy":
        metas = {root / NPY_META_NAME: read_npy_meta(root)}
    elif feature_format == "shards":  # diffusion/data/shards.py: the norm is recorded in shards.json
        metas = {p: json.loads(p.read_text()) for p in [root / "shards.json"] if p.is_file()}
    else:
        metas = {p: json.loads(p.read_text()) for p in sorted(root.glob("*/meta.json"))}
    found = {p: n for p, m in metas.items() if (n := recorded_norm(m)) is not None}
    if not found:
        return None, str(root)
    if len(set(found.values())) > 1:
        detail = ", ".join(f"{p}: {n}" for p, n in found.items())
        raise ValueError(f"{root}: features of different VAE normalisations ({detail}); train on one of them")
    path, norm = next(iter(found.items()))
    return norm, str(path)


class PackedShardWriter:
    """Fill one shard in place under a temporary name; `close()` renames it into place (complete or not at all).

    Rows never written stay `valid = False` (their features are zeros and must not be used).
    """

    def __init__(self, path: Path, paths: list[str], vae_shape: tuple[int, ...], uni_shape: tuple[int, ...]):
        self.path = Path(path)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        n = len(paths)
        self.h5 = h5py.File(self._tmp, "w")
        self.vae = self.h5.create_dataset("vae", (n, *vae_shape), dtype=np.float16)
        self.uni = self.h5.create_dataset("uni", (n, *uni_shape), dtype=np.float16)
        self.h5.create_dataset("paths", data=np.array(paths, dtype=object), dtype=h5py.string_dtype("utf-8"))
        self.valid = np.zeros(n, dtype=bool)
        self.h5.attrs["format"] = PACKED_FORMAT
        self.h5.attrs["version"] = PACKED_VERSION

    def write(self, row: int, vae: np.ndarray, uni: np.ndarray) -> None:
        if vae.shape != self.vae.shape[1:] or uni.shape != self.uni.shape[1:]:
            raise ValueError(
                f"{self.path}: row {row} has shapes {vae.shape}, {uni.shape}; "
                f"expected {self.vae.shape[1:]}, {self.uni.shape[1:]}"
            )
        self.vae[row] = vae.astype(np.float16, copy=False)
        self.uni[row] = uni.astype(np.float16, copy=False)
        self.valid[row] = True

    def close(self) -> None:
        self.h5.create_dataset("valid", data=self.valid)
        self.h5.close()
        self._ctx.__exit__(None, None, None)

    def __enter__(self) -> PackedShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.h5.close()
            finally:
                self._ctx.__exit__(exc_type, exc, tb)  # removes the temporary file


class PackedReader:
    """Random access into the shards of one key; h5py handles are opened lazily per process (fork-safe).

    At most `max_open` shard files are open at once (least recently used are closed), so a worker touching
    thousands of shards stays under the file-descriptor limit.
    """

    def __init__(self, packed_root: str | Path, key: str, num_patches: int, max_open: int = 64):
        self.root = Path(packed_root)
        self.key = key
        self.meta = read_packed_meta(packed_root, key)
        if self.meta["num_patches"] != num_patches:
            raise ValueError(
                f"{packed_meta_path(packed_root, key)}: packed for {self.meta['num_patches']} patches, "
                f"the index lists {num_patches} for {key!r}: re-pack after rebuilding the index"
            )
        self.shard_size = int(self.meta["shard_size"])
        missing = [
            s for s in range(self.meta["num_shards"]) if not packed_shard_path(self.root, key, s).is_file()
        ]
        if missing:
            first = packed_shard_path(self.root, key, missing[0])
            raise FileNotFoundError(
                f"{first}: missing ({len(missing)} of {self.meta['num_shards']} shards of "
                f"{key!r} missing; finish tools.extract_features / tools.pack_features)"
            )
        self.max_open = max_open
        self._files: OrderedDict[int, _OpenShard] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        # open HDF5 handles cannot be pickled (DataLoader workers under the spawn start method); reopen lazily
        return {**self.__dict__, "_files": OrderedDict()}

    def _shard(self, shard: int) -> _OpenShard:
        if self._pid != os.getpid():  # a forked DataLoader worker must not reuse the parent's handles
            self._files = OrderedDict()
            self._pid = os.getpid()
        entry = self._files.get(shard)
        if entry is None:
            h5 = h5py.File(packed_shard_path(self.root, self.key, shard), "r")
            # names and validity are read once per opened shard; per sample only the arrays are touched
            paths = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in h5["paths"][()]]
            entry = _OpenShard(h5, h5["vae"], h5["uni"], paths, h5["valid"][()])
            self._files[shard] = entry
            if len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].h5.close()
        else:
            self._files.move_to_end(shard)
        return entry

    def read(
        self,
        position: int,
        rel_path: str,
        latent_box: tuple[slice, slice] | None = None,
        tokens: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features of index entry `position`: vae (32, h, w) restricted to latent_box, uni (T', C) rows `tokens`."""
        entry, row = self._row(position, rel_path)
        name = entry.h5.filename
        try:
            vae = entry.vae[row] if latent_box is None else entry.vae[(row, slice(None), *latent_box)]
            uni = entry.uni[row]
        except OSError as err:
            raise SampleError(f"{name} row {row}: unreadable ({err})") from None
        return vae, (uni if tokens is None else uni[tokens])

    def read_uni(self, position: int, rel_path: str, tokens: np.ndarray | None = None) -> np.ndarray:
        """Only the UNI tokens of index entry `position` (rows `tokens`): no latent bytes are read."""
        entry, row = self._row(position, rel_path)
        try:
            uni = entry.uni[row]
        except OSError as err:
            raise SampleError(f"{entry.h5.filename} row {row}: unreadable ({err})") from None
        return uni if tokens is None else uni[tokens]

    def _row(self, position: int, rel_path: str) -> tuple[_OpenShard, int]:
        """The open shard and row of index entry `position`, checked against the index and its validity flag."""
        shard, row = divmod(position, self.shard_size)
        entry = self._shard(shard)
        name = entry.h5.filename
        if entry.paths[row] != rel_path:
            raise ValueError(
                f"{name} row {row} holds {entry.paths[row]!r} but the index says {rel_path!r}: the "
                "packed features are stale; re-run tools.pack_features for this index"
            )
        if not entry.valid[row]:
            raise SampleError(
                f"{rel_path}: marked invalid in {name} (feature extraction failed; see its log)"
            )
        return entry, row


@dataclass
class _OpenShard:
    h5: h5py.File
    vae: h5py.Dataset
    uni: h5py.Dataset
    paths: list[str]
    valid: np.ndarray


def npy_feature_shapes(features_root: Path, names: list[str], size: int) -> tuple[tuple, tuple]:
    """(vae, uni) shapes of one index key's per-patch npy features, from the first readable pair of the right latent
    size (the channel count and the UNI dim are the encoders' choice); the packing tools size their output by it."""
    g, lat = size // UNI_TILE, size // VAE_FACTOR
    for name in names:
        try:
            vae, uni = (load_npy(p) for p in npy_feature_paths(features_root, name))
        except SampleError:
            continue
        if vae.ndim == 3 and vae.shape[1:] == (lat, lat) and uni.size == g * g * uni.shape[-1]:
            return tuple(vae.shape), (g * g, uni.shape[-1])
    raise ValueError(
        f"no readable feature pair of {size} px patches under {features_root} "
        f"(expected e.g. {npy_feature_paths(features_root, names[0])[0]})"
    )
