"""Where sampling conditions come from: grids of UNI2-h tokens, with the real image they describe when there is one.

A *source* lists `Spec`s (one per image to generate) and loads each one as a token grid and/or its real image:

    IndexSource       the dataset index (`patches/metadata/patch_names_all.hdf5`) and the patches' stored
                      features (`<patch>_uni.npy` or packed shards, read by diffusion.data.features): all
                      crops, a random `n_images` of them, or the crops of listed patches
    FolderSource      image files; their UNI2-h tokens are computed on the fly by the caller (`embed_grid`)
    EmbeddingSource   an `.npy` / `.safetensors` file of embeddings
    RegionSource      whole large regions for the 4K tool: a large image, an embedding-grid file, or a square of
                      adjacent dataset patches stitched together

Geometry. One UNI token describes one `tile` px tile (256 px for UNI2-h at 20x); a model that takes T = m*m
tokens makes images of m*tile px (m = 1: PixCell-256, m = 4: PixCell-1024). A grid of gh x gw tokens is cut
into (gh/m) x (gw/m) crops, each one image: a 1024 px patch with its (16, 1536) features gives 16 conditions
for PixCell-256 or one for PixCell-1024. Tokens are row-major over the tiles, as the published features are.

Error messages name the parameters in backquotes (`n_images`); the command-line tools print them as their flags
(diffusion/command.py: FLAGS). Bad input: a path that does not exist, a file of the wrong shape, NaNs: one-line ValueError/FileNotFoundError at
once. Inside a long list (a missing or unreadable feature file, a truncated patch image), `load` raises
`SampleError`, which the runner logs and counts as a skip (hard stop past a threshold).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.features import PACKED_DIRNAME, PackedReader, SampleError, load_npy, npy_feature_paths
from ..data.index import INDEX_RELPATH, index_lengths, key_size, resolve_keys
from ..geometry import IMAGE_SUFFIXES, crop_token_indices
from .checks import CONDITION_LIMIT

__all__ = ["SampleError"]  # re-exported: the data module's "skip and count this one" error


@dataclass(frozen=True)
class Spec:
    """One image to generate: a crop of `rows` x `cols` tokens at token (y, x) of an entry's grid."""

    name: str  # output file stem relative to OUT/syn (and OUT/real), '/'-separated
    entry: str  # the entry inside its source (a patch path, an image file, a row of an embedding file)
    y: int  # top-left token of the crop
    x: int
    rows: int  # crop size in tokens
    cols: int
    has_real: bool  # a real image exists for it (written to OUT/real)
    source: dict = field(default_factory=dict, compare=False)  # manifest description, JSON-able


@dataclass
class Loaded:
    """What `load(spec)` returns: tokens (rows, cols, C) float32 and/or the real image (H, W, 3) uint8."""

    tokens: np.ndarray | None
    image: np.ndarray | None


def crop_names(stem: str, grid: tuple[int, int], m: int, tile: int) -> list[tuple[str, int, int]]:
    """(name, token y, token x) of every m x m crop of a (gh, gw) grid; a single crop keeps the bare stem."""
    gh, gw = grid
    if gh % m or gw % m:
        raise SampleError(
            f"{stem}: {gh * tile}x{gw * tile} px is not a multiple of the model's {m * tile} px images"
        )
    if gh == gw == m:
        return [(stem, 0, 0)]
    return [(f"{stem}_y{y * tile}_x{x * tile}", y, x) for y in range(0, gh, m) for x in range(0, gw, m)]


def read_image(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8; SampleError when missing, unreadable or not of `size` (h, w)."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise SampleError(f"{path}: image missing") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise SampleError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    if size is not None and array.shape[:2] != tuple(size):
        raise SampleError(f"{path}: {array.shape[0]}x{array.shape[1]} px, expected {size[0]}x{size[1]}")
    return array


def image_size(path: Path) -> tuple[int, int]:
    """(h, w) from the header only; SampleError when unreadable."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError) as err:
        raise SampleError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None


#################################################################################
#                            Per-patch features                                 #
#################################################################################
# Storage is the data module's (diffusion.data.features): the published per-patch `.npy` layout, or packed
# HDF5 shards; sampling needs only the UNI tokens of a patch, as a (g, g, C) grid.


def feature_path(features_root: Path, rel_patch: str) -> Path:
    """`grp/single_1024/slide/3_4.jpeg` -> `<features_root>/grp/single_1024/slide/3_4_uni.npy`."""
    return npy_feature_paths(features_root, rel_patch)[1]


def as_token_grid(
    array: np.ndarray, where: str, grid: int | None = None, channels: int | None = None, grids: bool = False
) -> np.ndarray:
    """Tokens as a (gh, gw, C) float32 grid: (C,) -> (1, 1, C); (T, C) with T = g*g -> (g, g, C); with
    `grids`, (gh, gw, C) is kept. `grid`: the side a square grid must have; `channels`: the embedding dim.
    SampleError (a ValueError) naming `where` when the array is unusable: wrong shape, wrong dim, NaN/Inf."""
    if array.ndim == 1:
        array = array[None]
    if array.ndim == 2:
        side = math.isqrt(array.shape[0])
        if side * side != array.shape[0] or (grid is not None and side != grid):
            want = f"({grid * grid}, C)" if grid else "(T, C) with T = g*g tokens, a square grid"
            raise SampleError(f"{where}: shape {tuple(array.shape)}, expected {want}")
        array = array.reshape(side, side, -1)
    elif not (grids and array.ndim == 3):
        raise SampleError(f"{where}: shape {tuple(array.shape)}, expected (T, C){' or (gh, gw, C)' * grids}")
    if channels is not None and array.shape[-1] != channels:
        raise SampleError(f"{where}: tokens of dim {array.shape[-1]}, the model takes {channels}")
    tokens = np.asarray(array, dtype=np.float32)
    if not np.isfinite(tokens).all():
        raise SampleError(f"{where}: contains NaN or Inf values")
    peak = float(np.abs(tokens).max(initial=0.0))
    if peak > CONDITION_LIMIT:  # finite, but its image would come out black (checks.py)
        raise SampleError(f"{where}: holds values up to {peak:.3g}; UNI2-h embeddings are of order 1-10")
    return tokens


def read_patch_tokens(path: Path, grid: int | None = None, channels: int | None = None) -> np.ndarray:
    """A `<patch>_uni.npy` file as a (g, g, C) float32 grid; SampleError when missing or unusable."""
    return as_token_grid(load_npy(path), str(path), grid, channels)


#################################################################################
#                                   Sources                                     #
#################################################################################


class ConditionSource:
    """Base: `specs()` lists what to generate, `load(spec)` reads it (called in DataLoader workers)."""

    kind = "source"

    def __init__(self, tokens_side: int, tile: int, channels: int | None = None):
        self.m = tokens_side  # model tokens per side (1 at 256 px, 4 at 1024 px)
        self.tile = tile  # px per token
        self.channels = channels  # UNI embedding size the model takes (None: not checked here)

    def specs(self, skipped: list[str] | None = None) -> list[Spec]:
        """What to generate, in a fixed order. Unusable entries found while listing go to `skipped` (or raise)."""
        raise NotImplementedError

    def load(self, spec: Spec) -> Loaded:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind

    def run_info(self) -> dict:
        """Source options that change the pixels, recorded in (and checked against) OUT/run.json."""
        return {}


def _crop_image(image: np.ndarray | None, spec: Spec, tile: int) -> np.ndarray | None:
    if image is None:
        return None
    y, x = spec.y * tile, spec.x * tile
    return np.ascontiguousarray(image[y : y + spec.rows * tile, x : x + spec.cols * tile])


def _crop_tokens(grid: np.ndarray, spec: Spec) -> np.ndarray:
    """The crop's (rows, cols, C) sub-grid: the same token selection as the training data's crops."""
    gh, gw, c = grid.shape
    idx = crop_token_indices((gh, gw), spec.y, spec.x, spec.rows, spec.cols)
    return grid.reshape(gh * gw, c)[idx].reshape(spec.rows, spec.cols, c)


class IndexSource(ConditionSource):
    """Conditions from the dataset: the HDF5 index (or a list of patch paths) and the patches' stored UNI features.

    index_file: `<root>/metadata/patch_names_all.hdf5`, one string dataset per `<dataset>_<size>` (relative
    patch paths). keys: which datasets (default all; `tcga` names `tcga_<size>` when one size is indexed).
    n_images: a random subset of that many crops, drawn with `seed` over all crops of all patches (without
    replacement), else every crop. patches: relative patch paths instead of an index (every crop of each).
    data_root: where the patches are (default: the index's root). features: "npy" (`<patch>_uni.npy`, beside
    the patches unless features_root says otherwise) or "packed" (the data module's HDF5 shards, default
    `<data_root>/features_packed`; needs the index, whose positions address the shards).
    """

    kind = "index"

    def __init__(
        self,
        tokens_side: int,
        tile: int,
        channels: int | None = None,
        index_file: str | Path | None = None,
        patches: Sequence[str] | None = None,
        data_root: str | Path | None = None,
        features_root: str | Path | None = None,
        keys: Sequence[str] | None = None,
        n_images: int | None = None,
        seed: int = 0,
        features: str = "npy",
    ):
        super().__init__(tokens_side, tile, channels)
        if (index_file is None) == (patches is None):
            raise ValueError(
                "dataset conditions: give either an index file (`index_file`) or a patch list (`patches`)"
            )
        if features not in ("npy", "packed"):
            raise ValueError(f"`features` {features!r}: expected npy or packed")
        if features == "packed" and patches is not None:
            raise ValueError(
                "`features` packed needs `index_file` (packed shards are addressed by index position)"
            )
        self.index_file = Path(index_file) if index_file is not None else None
        if self.index_file is not None and not self.index_file.is_file():
            raise FileNotFoundError(
                f"index {self.index_file}: no such file (expected <root>/{INDEX_RELPATH.as_posix()})"
            )
        if data_root is None:
            if self.index_file is None:
                raise ValueError("`patches` needs `data_root` (the folder the patch paths are relative to)")
            data_root = self.index_file.parent.parent
        self.data_root = Path(data_root)
        if not self.data_root.is_dir():
            raise FileNotFoundError(f"data root {self.data_root}: no such folder")
        default = self.data_root if features == "npy" else self.data_root / PACKED_DIRNAME
        self.features_root = Path(features_root) if features_root is not None else default
        if not self.features_root.is_dir():
            raise FileNotFoundError(f"features root {self.features_root}: no such folder")
        self.features = features
        self.patches = list(patches) if patches is not None else None
        self.n_images = n_images
        self.seed = seed
        if n_images is not None and n_images < 1:
            raise ValueError(f"`n_images` {n_images}: expected >= 1")
        self.keys: list[str] = []
        self.readers: dict[str, PackedReader] = {}
        if self.index_file is not None:
            try:
                lengths = index_lengths(self.index_file)
            except OSError as err:
                raise ValueError(f"index {self.index_file}: not a readable HDF5 file ({err})") from None
            self.lengths = lengths
            self.keys = resolve_keys(lengths, keys, self.index_file)
            for key in self.keys:
                size = key_size(key)
                if size % (self.m * self.tile):
                    raise ValueError(
                        f"{self.index_file}: {key} holds {size} px patches, which cannot be cut into "
                        f"{self.m * self.tile} px images"
                    )
            if features == "packed":  # checks every shard exists and matches the index, now
                self.readers = {k: PackedReader(self.features_root, k, lengths[k]) for k in self.keys}

    def describe(self) -> str:
        return str(self.index_file) if self.index_file is not None else f"{len(self.patches)} listed patches"

    def _patch_specs(self, rel: str, key: str | None, position: int | None, side: int) -> list[Spec]:
        stem = os.path.splitext(rel)[0]
        return [
            Spec(
                name,
                rel,
                y,
                x,
                self.m,
                self.m,
                True,
                {
                    "type": "index",
                    "key": key,
                    "position": position,
                    "patch": rel,
                    "crop": [y * self.tile, x * self.tile],
                    "size": self.m * self.tile,
                },
            )
            for name, y, x in crop_names(stem, (side, side), self.m, self.tile)
        ]

    def specs(self, skipped: list[str] | None = None) -> list[Spec]:
        if self.patches is not None:
            out = []
            for rel in self.patches:
                try:  # the grid of a listed patch: from its feature file's header
                    side = read_patch_tokens(feature_path(self.features_root, rel)).shape[0]
                except SampleError as err:
                    raise FileNotFoundError(str(err)) from None
                out += self._patch_specs(rel, None, None, side)
            return self._subset(out)
        import h5py

        grids = {key: key_size(key) // self.tile for key in self.keys}
        per_patch = {key: (grids[key] // self.m) ** 2 for key in self.keys}
        counts = [self.lengths[key] * per_patch[key] for key in self.keys]
        total = sum(counts)
        if total == 0:
            raise ValueError(f"{self.index_file}: no patches under {', '.join(self.keys)}")
        if self.n_images is None:
            chosen = np.arange(total)
        elif self.n_images > total:
            raise ValueError(f"`n_images` {self.n_images}: the index holds only {total} crops")
        else:  # sampling without replacement, never listing every crop; sorted for locality on disk
            chosen = np.sort(np.random.default_rng(self.seed).choice(total, self.n_images, replace=False))
        out: list[Spec] = []
        starts = np.cumsum([0] + counts)
        with h5py.File(self.index_file, "r") as h5:
            for k, key in enumerate(self.keys):
                sel = chosen[(chosen >= starts[k]) & (chosen < starts[k + 1])] - starts[k]
                if len(sel) == 0:
                    continue
                patch_idx, crop_idx = np.divmod(sel, per_patch[key])
                uniq = np.unique(patch_idx)
                ds = h5[key]
                # h5py point selection (increasing indices) is slow for large selections: read all instead.
                names = ds[()][uniq] if len(uniq) > len(ds) // 20 else ds[uniq]
                by_idx = {
                    int(i): (n.decode() if isinstance(n, bytes) else str(n)) for i, n in zip(uniq, names)
                }
                cache: dict[int, list[Spec]] = {}
                for p, c in zip(patch_idx.tolist(), crop_idx.tolist()):
                    if p not in cache:
                        cache = {p: self._patch_specs(by_idx[p], key, p, grids[key])}
                    out.append(cache[p][c])
        return out

    def _subset(self, specs: list[Spec]) -> list[Spec]:
        if self.n_images is None:
            return specs
        if self.n_images > len(specs):
            raise ValueError(f"`n_images` {self.n_images}: the listed patches hold only {len(specs)} crops")
        keep = np.sort(np.random.default_rng(self.seed).choice(len(specs), self.n_images, replace=False))
        return [specs[i] for i in keep]

    def _tokens(self, spec: Spec) -> np.ndarray:
        key = spec.source["key"]
        if self.features == "packed":
            # Only the UNI rows: an empty latent box makes the reader skip the (much larger) VAE posterior.
            empty = (slice(0, 0), slice(0, 0))
            _, uni = self.readers[key].read(spec.source["position"], spec.entry, empty)
            return as_token_grid(uni, f"{self.features_root / key} [{spec.entry}]", channels=self.channels)
        grid = key_size(key) // self.tile if key else None
        return read_patch_tokens(feature_path(self.features_root, spec.entry), grid, self.channels)

    def load(self, spec: Spec) -> Loaded:
        grid = self._tokens(spec)
        if spec.y + spec.rows > grid.shape[0] or spec.x + spec.cols > grid.shape[1]:
            raise SampleError(
                f"{spec.entry}: features hold a {grid.shape[0]}x{grid.shape[1]} token grid, expected at least "
                f"{spec.y + spec.rows}x{spec.x + spec.cols}"
            )
        side = grid.shape[0] * self.tile
        image = read_image(self.data_root / spec.entry, (side, side))
        return Loaded(_crop_tokens(grid, spec), _crop_image(image, spec, self.tile))


class FolderSource(ConditionSource):
    """Conditions from image files (H&E at the model's resolution, 20x): their UNI tokens are computed on the fly.

    paths: image files and/or folders (searched recursively, sorted). An image of h x w px, both multiples of the
    model's image size, gives (h/size) x (w/size) conditions; each image is its own real reference.
    """

    kind = "images"

    def __init__(self, tokens_side: int, tile: int, paths: Sequence[str | Path], channels: int | None = None):
        super().__init__(tokens_side, tile, channels)
        self.files: dict[str, Path] = {}  # stem relative to its root -> file
        for p in map(Path, paths):
            if p.is_dir():
                found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
                if not found:
                    raise FileNotFoundError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) inside")
                items = [(f.relative_to(p).with_suffix("").as_posix(), f) for f in found]
            elif p.is_file():
                items = [(p.stem, p)]
            else:
                raise FileNotFoundError(f"{p}: no such image or folder")
            for stem, f in items:
                if stem in self.files:
                    raise ValueError(f"{f}: same output name {stem!r} as {self.files[stem]}")
                self.files[stem] = f

    def describe(self) -> str:
        return f"{len(self.files)} image file(s)"

    def sizes(self) -> dict[str, tuple[int, int] | SampleError]:
        out: dict[str, tuple[int, int] | SampleError] = {}
        for stem, f in self.files.items():
            try:
                out[stem] = image_size(f)
            except SampleError as err:
                out[stem] = err
        return out

    def specs(self, skipped: list[str] | None = None) -> list[Spec]:
        """Every crop of every readable image; unusable images go to `skipped` (or raise)."""
        out = []
        px = self.tile
        for stem, size in self.sizes().items():
            try:
                if isinstance(size, SampleError):
                    raise size
                h, w = size
                if h % (self.m * px) or w % (self.m * px):
                    raise SampleError(
                        f"{self.files[stem]}: {h}x{w} px, expected multiples of {self.m * px} px (the model's "
                        "image size; crop or tile your images first)"
                    )
                for name, y, x in crop_names(stem, (h // px, w // px), self.m, px):
                    src = {
                        "type": "image",
                        "file": str(self.files[stem]),
                        "crop": [y * px, x * px],
                        "size": self.m * px,
                    }
                    out.append(Spec(name, stem, y, x, self.m, self.m, True, src))
            except SampleError as err:
                if skipped is None:
                    raise ValueError(str(err)) from None
                skipped.append(str(err))
        return out

    def load(self, spec: Spec) -> Loaded:
        image = read_image(self.files[spec.entry])
        return Loaded(None, _crop_image(image, spec, self.tile))


def _tensors_from_file(path: Path) -> dict[str, np.ndarray]:
    """{name: array} from an .npy (one array) or .safetensors (one or more tensors) file."""
    if not path.is_file():
        raise FileNotFoundError(f"embeddings {path}: no such file")
    try:
        if path.suffix == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(sorted(load_file(str(path)).items()))
    except Exception as err:
        raise ValueError(f"embeddings {path}: unreadable ({type(err).__name__}: {err})") from None
    raise ValueError(f"embeddings {path}: expected a .npy or .safetensors file")


def token_grids(path: Path, channels: int, regions: bool = False) -> dict[str, np.ndarray]:
    """Read an embeddings file as {name: (gh, gw, C) token grid}; one-line ValueError for any other shape.

    Conditions (regions=False): an .npy or single-tensor .safetensors holds a stack, (N, T, C), (N, C) or
    (N, g, g, C), named `<stem>_000000`...; a .safetensors with several tensors holds one condition per key,
    (T, C), (g, g, C) or (C,). Regions (regions=True): an .npy is one grid, (gh, gw, C) or (g*g, C), or a stack
    (N, gh, gw, C); each .safetensors tensor is one grid. T must be a square number of tokens.
    """
    arrays = _tensors_from_file(path)
    out: dict[str, np.ndarray] = {}
    for key, a in arrays.items():
        where = f"{path}{f' [{key}]' if key else ''}"
        if a.dtype.kind != "f":
            raise ValueError(f"embeddings {where}: dtype {a.dtype}, expected float")
        if regions:
            expect = f"(gh, gw, {channels}), (g*g, {channels}) or (N, gh, gw, {channels})"
            stacked, ok = a.ndim == 4 and not key, a.ndim in ((2, 3, 4) if not key else (2, 3))
        else:
            expect = f"(N, T, {channels}) or (N, {channels}) with T = g*g tokens"
            stacked = len(arrays) == 1
            ok = a.ndim in ((2, 3, 4) if stacked else (1, 2, 3))
        if not ok or a.shape[-1] != channels:
            raise ValueError(
                f"embeddings {where}: shape {tuple(a.shape)}; expected {expect} (the model's UNI dim is {channels})"
            )
        stem = key or path.stem
        if stacked:
            for i in range(len(a)):
                out[f"{stem}_{i:06d}"] = as_token_grid(a[i], f"embeddings {where} row {i}", grids=True)
        else:
            out[stem] = as_token_grid(a, f"embeddings {where}", grids=True)
    if not out:
        raise ValueError(f"embeddings {path}: empty")
    return out


class EmbeddingSource(ConditionSource):
    """Conditions from an `.npy` / `.safetensors` file of UNI embeddings (no real images)."""

    kind = "embeddings"

    def __init__(self, tokens_side: int, tile: int, path: str | Path, channels: int):
        super().__init__(tokens_side, tile, channels)
        self.path = Path(path)
        self.grids = token_grids(self.path, channels)
        m = tokens_side
        for name, g in self.grids.items():
            if g.shape[0] % m or g.shape[1] % m:
                raise ValueError(
                    f"embeddings {self.path}: {name} has {g.shape[0] * g.shape[1]} tokens, the model takes "
                    f"{m * m} per image (expected shape (N, {m * m}, {channels}), or a multiple grid to cut)"
                )

    def describe(self) -> str:
        return f"{self.path} ({len(self.grids)} embedding(s))"

    def specs(self, skipped: list[str] | None = None) -> list[Spec]:
        out = []
        for entry, g in self.grids.items():
            for name, y, x in crop_names(entry, g.shape[:2], self.m, self.tile):
                src = {"type": "embeddings", "file": str(self.path), "entry": entry, "token": [y, x]}
                out.append(Spec(name, entry, y, x, self.m, self.m, False, src))
        return out

    def load(self, spec: Spec) -> Loaded:
        return Loaded(_crop_tokens(self.grids[spec.entry], spec), None)


#################################################################################
#                           Large regions (the 4K tool)                         #
#################################################################################


class RegionSource(ConditionSource):
    """Whole regions for sliding-window generation, each one Spec: a large image (tokens computed on the fly by
    the caller), an embedding-grid file, or a square of k x k adjacent dataset patches.

    window_px: the model's image size (1024 for PixCell-1024); a region must be a multiple of it on each side.
    """

    kind = "regions"

    def __init__(
        self,
        tokens_side: int,
        tile: int,
        channels: int,
        images: Sequence[str | Path] = (),
        grids: Sequence[str | Path] = (),
        dataset_regions: Sequence[tuple[str, int, int]] = (),
        data_root: str | Path | None = None,
        features_root: str | Path | None = None,
        region_size: int = 4096,
    ):
        super().__init__(tokens_side, tile, channels)
        self.window_px = tokens_side * tile
        self.entries: dict[str, dict] = {}
        self.token_grids: dict[str, np.ndarray] = {}
        for p in map(Path, images):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such image")
            try:
                h, w = image_size(p)
            except SampleError as err:
                raise ValueError(str(err)) from None
            self._add(p.stem, (h, w), {"type": "image", "file": str(p)}, file=p)
        for p in map(Path, grids):
            for name, g in token_grids(p, channels, regions=True).items():
                self.token_grids[name] = g
                self._add(
                    name,
                    (g.shape[0] * tile, g.shape[1] * tile),
                    {"type": "grid", "file": str(p), "entry": name},
                )
        if dataset_regions:
            if data_root is None:
                raise ValueError("`dataset_regions` needs `data_root` (the patches folder)")
            self.data_root = Path(data_root)
            self.features_root = Path(features_root) if features_root else self.data_root
            for root in (self.data_root, self.features_root):
                if not root.is_dir():
                    raise FileNotFoundError(f"{root}: no such folder")
            if region_size % self.window_px:
                raise ValueError(f"`region_size` {region_size}: expected a multiple of {self.window_px} px")
            for slide, row, col in dataset_regions:
                self._add_dataset_region(slide, int(row), int(col), region_size)
        if not self.entries:
            raise ValueError("no regions given (use `images`, `grids` or `dataset_regions`)")

    def _add(self, name: str, size: tuple[int, int], src: dict, **extra) -> None:
        h, w = size
        if h % self.window_px or w % self.window_px or h < self.window_px or w < self.window_px:
            raise ValueError(
                f"{src.get('file', name)}: region {h}x{w} px; expected multiples of {self.window_px} px "
                "(the model's window)"
            )
        if name in self.entries:
            raise ValueError(f"two regions named {name!r} ({src.get('file')}); rename one")
        self.entries[name] = {"size": (h, w), "source": {**src, "size": [h, w]}, **extra}

    def _add_dataset_region(self, slide: str, row: int, col: int, region: int) -> None:
        slide_dir = self.data_root / slide
        if not slide_dir.is_dir():
            raise FileNotFoundError(f"{slide_dir}: no such slide folder")
        m = re.search(r"single_(\d+)", Path(slide).as_posix())
        patch_px = int(m.group(1)) if m else None
        files: dict[tuple[int, int], Path] = {}
        for f in slide_dir.iterdir():
            rc = re.match(r"^(\d+)_(\d+)$", f.stem)
            if rc and f.suffix.lower() in IMAGE_SUFFIXES:
                files[int(rc.group(1)), int(rc.group(2))] = f
        if patch_px is None:
            any_file = files.get((row, col))
            if any_file is None:
                raise FileNotFoundError(f"{slide_dir}: no patch {row}_{col}.*")
            patch_px = image_size(any_file)[0]
        if region % patch_px:
            raise ValueError(
                f"`region_size` {region}: not a multiple of the {patch_px} px patches of {slide_dir}"
            )
        k = region // patch_px
        patches = []
        for i in range(k):
            for j in range(k):
                f = files.get((row + i, col + j))
                if f is None:
                    raise FileNotFoundError(
                        f"{slide_dir}: patch {row + i}_{col + j} missing for the {region} px region at {row}_{col}"
                    )
                patches.append(f.relative_to(self.data_root).as_posix())
        name = f"{Path(slide).as_posix()}/{row}_{col}_{region}px"
        src = {"type": "dataset", "slide": Path(slide).as_posix(), "at": [row, col], "patches": patches}
        self._add(name, (region, region), src, patches=patches, k=k, patch_px=patch_px)

    def describe(self) -> str:
        return f"{len(self.entries)} region(s)"

    def specs(self, skipped: list[str] | None = None) -> list[Spec]:
        out = []
        for name, e in self.entries.items():
            h, w = e["size"]
            has_real = e["source"]["type"] != "grid"
            out.append(Spec(name, name, 0, 0, h // self.tile, w // self.tile, has_real, e["source"]))
        return out

    def load(self, spec: Spec) -> Loaded:
        e = self.entries[spec.entry]
        kind = e["source"]["type"]
        if kind == "grid":
            return Loaded(self.token_grids[spec.entry], None)
        if kind == "image":
            return Loaded(None, read_image(e["file"], e["size"]))
        # dataset: stitch k x k patches and their token grids
        k, px = e["k"], e["patch_px"]
        g = px // self.tile
        image = np.zeros((k * px, k * px, 3), np.uint8)
        tokens = np.zeros((k * g, k * g, self.channels), np.float32)
        for n, rel in enumerate(e["patches"]):
            i, j = divmod(n, k)
            image[i * px : (i + 1) * px, j * px : (j + 1) * px] = read_image(self.data_root / rel, (px, px))
            tokens[i * g : (i + 1) * g, j * g : (j + 1) * g] = read_patch_tokens(
                feature_path(self.features_root, rel), g, self.channels
            )
        return Loaded(tokens, image)


def name_seed(seed: int, name: str) -> int:
    """A per-image seed from the run's base seed and the image's name: independent of order and sharding."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
