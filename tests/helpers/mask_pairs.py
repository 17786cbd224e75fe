"""Image/instance-mask pairs with a known answer, for the ControlNet trainer tests (256 and 1024 px)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_pairs(root: Path, n: int, seed: int = 0, size: int = 256) -> None:
    """Cells (dark purple squares) where the instance mask says, on pink background."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    s = size // 256
    for i in range(n):
        labels = np.zeros((size, size), np.uint8)
        for k in range(1, 6):
            y, x = rng.integers(16 * s, 240 * s, 2)
            labels[y - 12 * s : y + 12 * s, x - 12 * s : x + 12 * s] = k
        image = np.full((size, size, 3), (230, 200, 220), np.uint8)
        image[labels > 0] = (90, 40, 140)
        Image.fromarray(image).save(root / "images" / f"p{i}.png")
        Image.fromarray(labels).save(root / "masks" / f"p{i}.png")
