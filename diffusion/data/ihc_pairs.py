"""Paired H&E / IHC image folders of the two public virtual-staining datasets, paired by file name.

    MIST       <root>/<stain>/TrainValAB/{trainA, trainB, valA, valB}   A = H&E, B = IHC; stains HER2, ER, PR, Ki67
    HER2Match  <root>/HE_20x/<split>, <root>/IHC_20x/<split>            splits train, val, test

Both ship 1024 x 1024 px images at 20x with the same file name on both sides. A file present on one side only is
an error that names the first few such files (pass `on_unpaired="skip"` to leave them out with a logged count).
Unreadable images inside a data loop are skipped with a running count and stop the run past a threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from diffusion.geometry import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

MIST_STAINS = ("HER2", "ER", "PR", "Ki67")
MIST_SPLITS = ("train", "val")
HER2MATCH_SPLITS = ("train", "val", "test")
DATASETS = ("MIST", "HER2Match")


@dataclass(frozen=True)
class Pair:
    """One H&E image and its IHC counterpart (same file name)."""

    name: str
    he: Path
    ihc: Path


def list_images(folder: Path) -> dict[str, Path]:
    """Image files of a folder by name (hidden files and non-images ignored)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    }


def pair_folders(he_dir: Path, ihc_dir: Path, on_unpaired: str = "error") -> list[Pair]:
    """Pair the images of two folders by file name, sorted by name."""
    if on_unpaired not in ("error", "skip"):
        raise ValueError(f"on_unpaired must be 'error' or 'skip', got {on_unpaired!r}")
    he, ihc = list_images(he_dir), list_images(ihc_dir)
    only_he, only_ihc = sorted(set(he) - set(ihc)), sorted(set(ihc) - set(he))
    if only_he or only_ihc:
        parts = []
        for names, here, there in ((only_he, he_dir, ihc_dir), (only_ihc, ihc_dir, he_dir)):
            if names:
                more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
                parts.append(f"{len(names)} in {here} but not in {there}: {', '.join(names[:3])}{more}")
        msg = "unpaired images: " + "; ".join(parts)
        if on_unpaired == "error":
            raise ValueError(msg + " (every H&E image needs an IHC image with the same file name)")
        log.warning("%s; skipped", msg)
    pairs = [Pair(n, he[n], ihc[n]) for n in sorted(set(he) & set(ihc))]
    if not pairs:
        raise ValueError(f"no paired images in {he_dir} and {ihc_dir}")
    return pairs


def mist_folders(root: str | Path, stain: str, split: str) -> tuple[Path, Path]:
    """(H&E folder, IHC folder) of a MIST split."""
    if stain not in MIST_STAINS:
        raise ValueError(f"MIST stain {stain!r}: expected one of {', '.join(MIST_STAINS)}")
    if split not in MIST_SPLITS:
        raise ValueError(f"MIST split {split!r}: expected one of {', '.join(MIST_SPLITS)}")
    base = Path(root) / stain / "TrainValAB"
    return base / f"{split}A", base / f"{split}B"


def her2match_folders(root: str | Path, split: str) -> tuple[Path, Path]:
    """(H&E folder, IHC folder) of a HER2Match split."""
    if split not in HER2MATCH_SPLITS:
        raise ValueError(f"HER2Match split {split!r}: expected one of {', '.join(HER2MATCH_SPLITS)}")
    return Path(root) / "HE_20x" / split, Path(root) / "IHC_20x" / split


def check_target(dataset: str, stain: str) -> None:
    """One-line ValueError for a dataset / stain combination that does not exist."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    if dataset == "MIST" and stain not in MIST_STAINS:
        raise ValueError(f"MIST stain {stain!r}: expected one of {', '.join(MIST_STAINS)}")
    if dataset == "HER2Match" and stain != "HER2":
        raise ValueError(f"HER2Match has HER2 IHC only, got stain {stain!r}")


def dataset_pairs(
    dataset: str, root: str | Path, split: str, stain: str = "HER2", on_unpaired: str = "error"
) -> list[Pair]:
    """The image pairs of a split of MIST (any stain) or HER2Match (HER2 only)."""
    check_target(dataset, stain)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{dataset} root {root}: no such folder")
    if dataset == "MIST":
        he_dir, ihc_dir = mist_folders(root, stain, split)
    else:
        he_dir, ihc_dir = her2match_folders(root, split)
    return pair_folders(he_dir, ihc_dir, on_unpaired)


def read_image(path: str | Path, size: int | None = None) -> Tensor:
    """An RGB image file -> (3, H, W) float in [0, 1]; with `size`, it must be size x size (no silent resize)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot read the image ({type(err).__name__}: {err})") from None
    if size is not None and arr.shape[:2] != (size, size):
        raise ValueError(f"{path}: expected a {size}x{size} image, got {arr.shape[1]}x{arr.shape[0]}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


class PairedImages(Dataset):
    """Dataset of (he (3, S, S), ihc (3, S, S), index) in [0, 1]; `sides` picks which images are read."""

    def __init__(self, pairs: list[Pair], size: int = 1024, sides: tuple[str, ...] = ("he", "ihc")):
        if not pairs:
            raise ValueError("PairedImages: no pairs")
        if not set(sides) <= {"he", "ihc"} or not sides:
            raise ValueError(f"sides must be a non-empty subset of ('he', 'ihc'), got {sides}")
        self.pairs, self.size, self.sides = pairs, size, sides

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        out: dict = {"index": i}
        for side in self.sides:
            out[side] = read_image(getattr(pair, side), self.size)
        return out
