"""Training data of the UNI prior: the stored UNI tokens of indexed patches (no latents read), with labels.

Samples are those of `PatchFeatureDataset` (crops of `resolution` px of the indexed parent patches, each with
its sub-grid of tokens): resolution 256 gives one token per sample (the PixCell-256 prior), 1024 gives the
16-token grid of a whole patch (the PixCell-1024 prior). Both storage formats (per-patch `.npy`, packed shards).

Labels, for conditional sampling, come for free from the published layout
`<dataset>/<cancer>/single_1024/<slide>/<row>_<col>.jpeg` (`label_from="dataset"` or `"cancer"`), or from a
CSV with columns `patch,label` (patch paths as in the index). Patches a CSV does not list keep the null label:
they train the unconditional flow only (counted in the log).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ..data.datasets import PatchFeatureDataset
from ..data.features import SampleError

log = logging.getLogger("pixcell.prior")
LABEL_SOURCES = ("dataset", "cancer")  # parts 0 and 1 of a patch path in the published layout
NO_LABEL = -1


def label_of(rel: str, source: str) -> str:
    """The label of a patch path from its place in the published layout; ValueError when it has no such part."""
    parts = rel.split("/")
    k = LABEL_SOURCES.index(source)
    if len(parts) < 3:
        raise ValueError(
            f"patch {rel!r}: cannot read a {source} label (expected <dataset>/<cancer>/.../<patch> paths)"
        )
    return parts[k]


def read_label_csv(path: str | Path) -> dict[str, str]:
    """{patch path: label} from a CSV with a header row holding `patch` and `label` columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label CSV {path}: no such file")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"patch", "label"} <= set(reader.fieldnames):
            raise ValueError(f"label CSV {path}: expected a header with columns patch,label")
        out: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            patch, label = (row["patch"] or "").strip(), (row["label"] or "").strip()
            if not patch or not label:
                raise ValueError(f"label CSV {path} line {line}: empty patch or label")
            out[patch] = label
    if not out:
        raise ValueError(f"label CSV {path}: no rows")
    return out


def describe_labels(label_from: str | None) -> str:
    return "no labels" if label_from is None else f"labels from {label_from}"


class UNITokenDataset(PatchFeatureDataset):
    """UNI tokens of every crop, plus a label id. Items: {"uni": (T, C) float32, "label": int (-1: none),
    "index", "path", "crop"}, or None when the sample failed (logged and counted; see PatchFeatureDataset)."""

    def __init__(self, *args: Any, label_from: str | None = None, in_memory: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.label_from = label_from
        # in_memory: keep every item once read (small datasets, e.g. the CPU demo; per process and worker)
        self.cache: dict[int, dict[str, Any]] | None = {} if in_memory else None
        self.label_names: list[str] = []
        self.label_ids: list[np.ndarray] = []  # per index key, one id per patch (-1: none)
        if label_from is not None:
            self._read_labels(label_from)

    def _read_labels(self, label_from: str) -> None:
        """One pass over the index: every patch's label, and the sorted label vocabulary."""
        table = None if label_from in LABEL_SOURCES else read_label_csv(label_from)
        per_key: list[list[str | None]] = []
        with h5py.File(self.index_file, "r") as h5:
            for key in self.keys:
                names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in h5[key][()]]
                if table is None:
                    per_key.append([label_of(n, label_from) for n in names])
                else:
                    per_key.append([table.get(n) for n in names])
        self.label_names = sorted({lab for labels in per_key for lab in labels if lab is not None})
        if not self.label_names:
            raise ValueError(f"label CSV {label_from}: none of its patches is in {self.index_file}")
        ids = {name: i for i, name in enumerate(self.label_names)}
        self.label_ids = [
            np.array([ids.get(lab, NO_LABEL) for lab in labels], np.int32) for labels in per_key
        ]
        missing = sum(int((a == NO_LABEL).sum()) for a in self.label_ids)
        if missing:
            log.warning(
                "%d indexed patches have no label in %s: they train the unconditional flow only",
                missing,
                label_from,
            )

    def label_of_index(self, index: int) -> int:
        key, position, _, _ = self.locate(index)
        if not self.label_ids:
            return NO_LABEL
        return int(self.label_ids[self.keys.index(key)][position])

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        key, position, row, col = self.locate(index)
        rel = self.patch_path(key, position)
        try:
            uni = self.load_uni(key, position, rel, row, col)
        except SampleError as err:
            failure = str(err)
        else:
            failure = None
        if failure is not None:  # outside the except block: a TooManyFailures carries no chained traceback
            self._record_failure(rel, failure)
            return None
        self.num_loaded += 1
        step = self.crop_grid
        item = {
            "uni": torch.from_numpy(np.array(uni, dtype=np.float32)),  # (T, C)
            "label": self.label_of_index(index),
            "index": index,
            "path": rel,
            "crop": (row * step, col * step),
        }
        if self.cache is not None:
            self.cache[index] = item
        return item


def read_tokens(dataset: UNITokenDataset, max_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `max_samples` samples drawn with `seed` (all when fewer), in index order: tokens (N, T, C) float32
    and label ids (N,) (-1: none). Deterministic, so every process and every resumed run reads the same ones."""
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{dataset.index_file}: the keys {', '.join(dataset.keys)} list no patches")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, min(n, max_samples), replace=False))
    items = [item for i in chosen if (item := dataset[int(i)]) is not None]
    if len(items) < 2:
        raise ValueError(f"only {len(items)} of the {len(chosen)} samples drawn could be read")
    return torch.stack([it["uni"] for it in items]), torch.tensor([it["label"] for it in items])


def token_stats(dataset: UNITokenDataset, max_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the tokens of up to `max_samples` samples (see `read_tokens`)."""
    tokens = read_tokens(dataset, max_samples, seed)[0].flatten(0, 1).double()  # (n*T, C)
    return tokens.mean(0).float(), tokens.std(0).float()
