"""Synthetic paired H&E/IHC folders in both published layouts (MIST, HER2Match), for the virtual-staining tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: int, seed: int) -> None:
    """A smooth random RGB image (compresses well, so 1024 px PNGs stay small)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize((size, size), Image.BILINEAR).save(path)


def make_mist(root: Path, stain: str = "HER2", split: str = "train", n: int = 3, size: int = 64) -> Path:
    for i in range(n):
        write_image(root / stain / "TrainValAB" / f"{split}A" / f"{i:03d}.png", size, i)
        write_image(root / stain / "TrainValAB" / f"{split}B" / f"{i:03d}.png", size, 100 + i)
    return root


def make_her2match(root: Path, split: str = "train", n: int = 3, size: int = 64) -> Path:
    for i in range(n):
        write_image(root / "HE_20x" / split / f"case{i}_0.png", size, i)
        write_image(root / "IHC_20x" / split / f"case{i}_0.png", size, 100 + i)
    return root
