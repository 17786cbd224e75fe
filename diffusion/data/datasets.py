"""Training samples: VAE latents and UNI2-h tokens of patches and of their crops.

A parent patch of `parent_size` px (1024 in the published data) gives (parent_size // resolution)^2 samples of
`resolution` px: the non-overlapping crops in row-major order, each with its latent crop and the matching sub-grid
of UNI tokens (one token per 256 px tile). Sample `i` is crop `i % crops` of index entry `i // crops`, as in the
original PixCell dataset, so a 256 crop's token equals the corresponding token of its 1024 parent.

The latent is drawn from the stored posterior, `mean + std * noise`, in raw VAE space (the trainer shifts and
scales it), with noise from a generator seeded by (seed, epoch, index): the same sample for the same epoch, in any
worker, from either storage format.

Failures never pass silently. A sample that cannot be loaded (missing/zero-byte/wrong-shaped `.npy`, NaN or Inf,
a row marked invalid in a packed shard) is logged with its path, counted, and `__getitem__` returns None;
`collate_skip_none` drops it from the batch (and reports how many were dropped in `batch["skipped"]`). Once a
process has seen at least `min_failures_before_stop` failures and they exceed `max_failure_rate` of its samples,
it raises `TooManyFailures`, which stops the DataLoader with that message. Set `failure_log` to also append
`path<TAB>reason` lines to a file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from diffusion.data.features import (
    PACKED_DIRNAME,
    UNI_SUFFIX,
    VAE_SUFFIX,
    PackedReader,
    SampleError,
    load_npy,
    npy_feature_paths,
)
from diffusion.data.index import default_index_file, index_lengths, key_size, resolve_keys
from diffusion.geometry import UNI_TILE, VAE_FACTOR, crop_token_indices

log = logging.getLogger("pixcell.data")


class TooManyFailures(RuntimeError):
    """More samples failed to load than `max_failure_rate` allows."""


class PatchFeatureDataset(Dataset):
    """Samples of `resolution` px cut from indexed `parent_size` px patches, with pre-extracted features.

    Each item is a dict:
        latent  float32 (16, r/8, r/8)  VAE latent sampled from the stored posterior (raw VAE space)
        uni     float32 (T, C)          UNI embeddings of the crop's 256 px tiles, row-major, T = (r/256)^2
        index   int                     the sample index
        path    str                     the parent patch path relative to `root`
        crop    (int, int)              top-left (row, col) of the crop in 256 px units
    or None when the sample failed to load (see the module docstring).
    """

    def __init__(
        self,
        root: str | Path,  # the patches root (holds <dataset>/... and metadata/)
        index_file: str | Path | None = None,  # default <root>/metadata/patch_names_all.hdf5
        dataset_keys: Sequence[str]
        | None = None,  # e.g. ["tcga_diagnostic_1024"]; None = every `*_<parent_size>`
        resolution: int = 256,  # sample side, a multiple of 256 <= parent_size
        parent_size: int = 1024,  # side of the stored patches
        feature_format: str = "npy",  # "npy" (per-patch files) or "packed" (HDF5 shards)
        features_root: str | Path | None = None,  # npy: default root; packed: default <root>/features_packed
        seed: int = 0,  # seeds the latent noise together with the epoch and the index
        max_failure_rate: float = 0.01,  # stop when more than this fraction of samples failed ...
        min_failures_before_stop: int = 10,  # ... and at least this many did
        failure_log: str | Path | None = None,  # append "path<TAB>reason" lines here too
        vae_suffix: str = VAE_SUFFIX,
        uni_suffix: str = UNI_SUFFIX,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"patches root {self.root}: no such folder")
        if resolution % UNI_TILE or not UNI_TILE <= resolution <= parent_size:
            raise ValueError(
                f"resolution {resolution}: expected a multiple of {UNI_TILE} between {UNI_TILE} and "
                f"parent_size {parent_size}"
            )
        if parent_size % UNI_TILE:
            raise ValueError(f"parent_size {parent_size}: expected a multiple of {UNI_TILE}")
        if feature_format not in ("npy", "packed"):
            raise ValueError(f"feature_format {feature_format!r}: expected 'npy' or 'packed'")
        if not 0 <= max_failure_rate <= 1:
            raise ValueError(f"max_failure_rate {max_failure_rate}: expected a fraction in [0, 1]")
        self.index_file = Path(index_file) if index_file is not None else default_index_file(self.root)
        self.resolution = resolution
        self.parent_size = parent_size
        self.feature_format = feature_format
        default_features = self.root if feature_format == "npy" else self.root / PACKED_DIRNAME
        self.features_root = Path(features_root) if features_root is not None else default_features
        self.seed = int(seed)
        self.epoch = 0
        self.max_failure_rate = max_failure_rate
        self.min_failures_before_stop = min_failures_before_stop
        self.failure_log = Path(failure_log) if failure_log is not None else None
        self.vae_suffix, self.uni_suffix = vae_suffix, uni_suffix

        lengths = index_lengths(self.index_file)
        if dataset_keys is None:
            keys = [k for k in lengths if k.endswith(f"_{parent_size}")]
            if not keys:
                raise ValueError(
                    f"{self.index_file}: no key ending in _{parent_size} (keys: {', '.join(lengths)})"
                )
        else:
            # a bare dataset name means its parent-size key: "tcga" -> "tcga_1024"
            wanted = [
                k if k in lengths or f"{k}_{parent_size}" not in lengths else f"{k}_{parent_size}"
                for k in dataset_keys
            ]
            keys = resolve_keys(lengths, wanted, self.index_file)
            for key in keys:
                if key_size(key) != parent_size:
                    raise ValueError(
                        f"{self.index_file}: key {key!r} holds {key_size(key)} px patches, "
                        f"expected parent_size {parent_size}"
                    )
        self.keys = keys
        self.lengths = [lengths[k] for k in keys]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

        # crops: non-overlapping, row-major, top-left aligned
        self.crops_per_side = parent_size // resolution
        self.crops_per_patch = self.crops_per_side**2
        self.parent_grid = parent_size // UNI_TILE  # UNI tokens per side of the parent
        self.crop_grid = resolution // UNI_TILE
        self.latent_side = parent_size // VAE_FACTOR  # of the parent; channels are 2 * latent channels

        self._readers = None
        if feature_format == "packed":
            self._readers = {k: PackedReader(self.features_root, k, n) for k, n in zip(keys, self.lengths)}
            for key, reader in self._readers.items():
                vae_shape, uni_shape = reader.meta["vae_shape"], reader.meta["uni_shape"]
                if vae_shape[1:] != [self.latent_side] * 2 or uni_shape[0] != self.parent_grid**2:
                    raise ValueError(
                        f"{self.features_root / key}: packed shapes vae {vae_shape}, uni {uni_shape} "
                        f"do not fit parent_size {parent_size}"
                    )
        self._h5 = None
        self._h5_pid = None
        self._h5_keys: dict[str, h5py.Dataset] = {}
        self.num_loaded = 0
        self.num_failed = 0
        self.failures: list[tuple[str, str]] = []  # (path, reason) seen by this process

    # ------------------------------------------------------------------ indexing
    def __len__(self) -> int:
        return int(self.offsets[-1]) * self.crops_per_patch

    def set_epoch(self, epoch: int) -> None:
        """Draw new latent noise: samples are seeded by (seed, epoch, index)."""
        self.epoch = int(epoch)

    def locate(self, index: int) -> tuple[str, int, int, int]:
        """Sample index -> (key, position in that key, crop row, crop col) in crop units."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range (dataset has {len(self)})")
        patch, sub = divmod(index, self.crops_per_patch)
        k = int(np.searchsorted(self.offsets, patch, side="right") - 1)
        row, col = divmod(sub, self.crops_per_side)
        return self.keys[k], int(patch - self.offsets[k]), row, col

    def __getstate__(self) -> dict:
        # the index handle is per process (spawned DataLoader workers reopen it)
        return {**self.__dict__, "_h5": None, "_h5_pid": None, "_h5_keys": {}}

    def _index_dataset(self, key: str) -> h5py.Dataset:
        if self._h5 is None or self._h5_pid != os.getpid():  # one handle per (forked) worker process
            self._h5 = h5py.File(self.index_file, "r")
            self._h5_pid = os.getpid()
            self._h5_keys = {}
        if key not in self._h5_keys:
            self._h5_keys[key] = self._h5[key]
        return self._h5_keys[key]

    def patch_path(self, key: str, position: int) -> str:
        """The index entry: the parent patch path relative to `root`."""
        name = self._index_dataset(key)[position]
        return name.decode("utf-8") if isinstance(name, bytes) else str(name)

    # ------------------------------------------------------------------ loading
    def _load(self, key: str, position: int, rel: str, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean|std (2k, r/8, r/8), uni (t, C)) of one crop, as stored (float16)."""
        lat = self.resolution // VAE_FACTOR
        box = (slice(row * lat, (row + 1) * lat), slice(col * lat, (col + 1) * lat))
        tokens = self._token_rows(row, col)
        if self.feature_format == "packed":
            vae, uni = self._readers[key].read(position, rel, box, tokens)
        else:
            vae_path, uni_path = npy_feature_paths(self.features_root, rel, self.vae_suffix, self.uni_suffix)
            vae_all = load_npy(vae_path)
            side = self.latent_side
            if vae_all.ndim != 3 or vae_all.shape[0] % 2 or vae_all.shape[1:] != (side, side):
                raise SampleError(
                    f"{vae_path}: shape {tuple(vae_all.shape)}, expected (2*latent_channels, {side}, {side}) "
                    f"for {self.parent_size} px patches"
                )
            vae = np.asarray(vae_all[(slice(None), *box)])
            uni = np.asarray(self._read_uni_npy(uni_path)[tokens])
        if not (np.isfinite(vae).all() and np.isfinite(uni).all()):
            which = "UNI embedding" if not np.isfinite(uni).all() else "VAE posterior"
            raise SampleError(f"{rel}: NaN or Inf in the {which} (crop {row},{col})")
        return vae, uni

    def _token_rows(self, row: int, col: int) -> np.ndarray:
        """The rows of the parent's (g*g, C) UNI tokens that fall in crop (row, col), row-major."""
        g, c = self.parent_grid, self.crop_grid
        return np.array(crop_token_indices(g, row * c, col * c, c, c))

    def _read_uni_npy(self, uni_path: Path) -> np.ndarray:
        """A parent's `_uni.npy` as (g*g, C), memory-mapped; SampleError when it has another shape."""
        g = self.parent_grid
        uni_all = load_npy(uni_path)
        if uni_all.ndim == 1 and g == 1:  # single-token features saved as (C,)
            uni_all = uni_all[None]
        if uni_all.ndim != 2 or uni_all.shape[0] != g * g:
            raise SampleError(
                f"{uni_path}: shape {tuple(uni_all.shape)}, expected ({g * g}, C) for {self.parent_size} px patches"
            )
        return uni_all

    def load_uni(self, key: str, position: int, rel: str, row: int, col: int) -> np.ndarray:
        """Only the UNI tokens (t, C) of one crop, as stored (the UNI prior's trainer reads no latents)."""
        tokens = self._token_rows(row, col)
        if self.feature_format == "packed":
            uni = self._readers[key].read_uni(position, rel, tokens)
        else:
            uni = np.asarray(
                self._read_uni_npy(
                    npy_feature_paths(self.features_root, rel, self.vae_suffix, self.uni_suffix)[1]
                )[tokens]
            )
        if not np.isfinite(uni).all():
            raise SampleError(f"{rel}: NaN or Inf in the UNI embedding (crop {row},{col})")
        return uni

    def noise(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The standard normal draw of sample `index` for the current epoch (float32, `shape`)."""
        # SeedSequence mixes (seed, epoch, index) into independent streams; a Generator per sample keeps the
        # draw independent of worker count, batch composition and storage format.
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        key, position, row, col = self.locate(index)
        rel = self.patch_path(key, position)
        try:
            vae, uni = self._load(key, position, rel, row, col)
        except SampleError as err:
            failure = str(err)
        else:
            failure = None
        if (
            failure is not None
        ):  # recorded outside the except block: a TooManyFailures carries no chained traceback
            self._record_failure(rel, failure)
            return None
        mean, std = torch.from_numpy(np.array(vae, dtype=np.float32)).chunk(2)
        latent = mean + std * self.noise(index, tuple(mean.shape))
        self.num_loaded += 1
        step = self.crop_grid
        return {
            "latent": latent,  # (16, r/8, r/8)
            "uni": torch.from_numpy(np.array(uni, dtype=np.float32)),  # (T, C)
            "index": index,
            "path": rel,
            "crop": (row * step, col * step),
        }

    # ------------------------------------------------------------------ failures
    def _record_failure(self, path: str, reason: str) -> None:
        self.num_failed += 1
        self.failures.append((path, reason))
        seen = self.num_failed + self.num_loaded
        log.warning(
            "skip sample %s: %s [%d failed of %d seen in process %d]",
            path,
            reason,
            self.num_failed,
            seen,
            os.getpid(),
        )
        if self.failure_log is not None:
            with open(self.failure_log, "a") as fh:  # O_APPEND: lines from several workers do not interleave
                fh.write(f"{path}\t{reason}\n")
        rate = self.num_failed / seen
        if self.num_failed >= self.min_failures_before_stop and rate > self.max_failure_rate:
            raise TooManyFailures(
                f"{self.num_failed} of {seen} samples failed to load ({rate:.1%} > max_failure_rate "
                f"{self.max_failure_rate:.1%}); last: {reason}. Fix or remove those patches (paths in the log"
                f"{', ' + str(self.failure_log) if self.failure_log else ''}) and rebuild the index, or raise "
                "max_failure_rate"
            )


def collate_skip_none(batch: list[dict | None]) -> dict[str, Any] | None:
    """Collate the samples that loaded, dropping the Nones of failed ones; `skipped` = how many were dropped.

    Returns None when every sample of the batch failed (the training loop should skip that step).
    `crop` becomes a (B, 2) long tensor, `path` a list of str.
    """
    good = [b for b in batch if b is not None]
    if not good:
        return None
    out = default_collate([{k: v for k, v in b.items() if k not in ("path", "crop")} for b in good])
    out["path"] = [b["path"] for b in good]
    out["crop"] = torch.tensor([b["crop"] for b in good], dtype=torch.long)
    out["skipped"] = len(batch) - len(good)
    return out


#################################################################################
#                       What the trainers check and show                        #
#################################################################################


def real_crop(dataset: PatchFeatureDataset, path: str, crop: tuple[int, int], size: int) -> np.ndarray | None:
    """The real patch crop (uint8 (size, size, 3)) that a held-out sample came from, or None if unreadable."""
    try:
        with Image.open(dataset.root / path) as im:
            top, left = crop[0] * UNI_TILE, crop[1] * UNI_TILE
            return np.asarray(im.convert("RGB").crop((left, top, left + size, top + size)))
    except OSError:
        return None


def held_out_samples(dataset: PatchFeatureDataset, indices: Sequence[int], resolution: int) -> list[dict]:
    """The validation samples of a trainer: the items at `indices` that load, each with its real crop ("real")."""
    out = []
    for i in indices:
        item = dataset[i]
        if item is not None:
            item["real"] = real_crop(dataset, item["path"], item["crop"], resolution)
            out.append(item)
    return out


def check_data_matches_model(
    dataset: PatchFeatureDataset,
    model: torch.nn.Module,  # a PixCell transformer (its config: patch size, channels, token count and dim)
    resolution: int,  # px of the training samples
    model_name: str,  # how the error lines name the model (the config's `model`, or the base model's source)
) -> None:
    """One-line errors for a config that does not fit the data: latent size / patch size, token count and dim."""
    c = model.config
    lat = resolution // VAE_FACTOR
    if lat % c.patch_size:
        raise ValueError(
            f"config: resolution {resolution} gives {lat}x{lat} latents, not divisible by the "
            f"model's patch_size {c.patch_size}"
        )
    item = next((dataset[i] for i in range(min(len(dataset), 16)) if dataset[i] is not None), None)
    if item is None:
        raise ValueError(f"data {dataset.root}: none of the first samples loads (see the warnings above)")
    if tuple(item["latent"].shape) != (c.in_channels, lat, lat):
        raise ValueError(
            f"data {dataset.root}: latents of shape {tuple(item['latent'].shape)}, but the model "
            f"{model_name} at resolution {resolution} needs ({c.in_channels}, {lat}, {lat})"
        )
    if tuple(item["uni"].shape) != (c.caption_num_tokens, c.caption_channels):
        raise ValueError(
            f"data {dataset.root}: UNI features of shape {tuple(item['uni'].shape)} per sample, but "
            f"the model {model_name} takes ({c.caption_num_tokens}, {c.caption_channels}) "
            "(token count and embedding dim; check model, resolution and model_overrides)"
        )
