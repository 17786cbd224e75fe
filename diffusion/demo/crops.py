"""The demo generator's training set: crops of the slide's training part at any offset, flipped and rotated.

The first demo trained PixCell on the 26 fixed, non-overlapping 256 px tiles of the training rows: 26 (image,
embedding) pairs, each seen ~700 times in 1200 steps of batch 16. The model learnt those 26 pictures, not
tissue, and on held-out embeddings it made purple blur (issue 29). Crops at any offset (a nucleus lands
anywhere in the window, not at 26 fixed places) in the 8 flips/90-degree rotations (tissue has no orientation)
turn one slide region into hundreds of distinct pairs. Each crop is a file beside the tiles, so the project's
own tools give it its VAE latent and its UNI embedding (tools/extract_features.py), and the real training
script reads them as it reads any patch.

Crops never reach into the held-out rows: every pixel of a crop lies above `limit_y`.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion.atomic import atomic_path


def dihedral_array(image: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of an (H, W, C) array: k in 0..7 (k >= 4: transposed first)."""
    if k >= 4:
        image = image.transpose(1, 0, 2)
    return np.ascontiguousarray(np.rot90(image, k % 4))


def write_training_crops(
    slide_path: str | Path,
    out_dir: str | Path,
    count: int,
    limit_y: int,  # level-0 px: crops lie in rows [0, limit_y) (the held-out rows start there)
    size: int = 256,
    min_tissue: float = 0.5,
    seed: int = 0,
) -> list[Path]:
    """Write `count` random size x size tissue crops of the slide (level 0, any offset above `limit_y`, each in
    a random one of the 8 orientations) as PNG (lossless) into `out_dir`; returns their paths, sorted. A crop
    is kept when its tissue fraction (HSV saturation > 20/255, the floor of `diffusion.data.slides.tissue_mask`;
    a fixed threshold, since Otsu's within an all-tissue crop would split the tissue) is at least `min_tissue`."""
    from diffusion.data.slides import open_slide, read_rgb

    slide, _ = open_slide(slide_path)
    width, _ = slide.dimensions
    if limit_y < size or width < size:
        raise ValueError(f"training part {width}x{limit_y} px: too small for {size} px crops")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    region = np.asarray(read_rgb(slide, 0, 0, 0, max(width, limit_y)))[:limit_y, :width]
    rng = random.Random(seed)
    paths: list[Path] = []
    tries = 0
    while len(paths) < count:
        tries += 1
        if tries > 50 * count:
            raise RuntimeError(f"only {len(paths)} of {count} crops with >= {min_tissue:.0%} tissue found")
        y, x = rng.randrange(limit_y - size + 1), rng.randrange(width - size + 1)
        crop = region[y : y + size, x : x + size]
        if (np.asarray(Image.fromarray(crop).convert("HSV"))[..., 1] > 20).mean() < min_tissue:
            continue
        k = rng.randrange(8)
        path = out / f"y{y}_x{x}_d{k}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(dihedral_array(crop, k)).save(tmp, format="PNG")
        paths.append(path)
    return sorted(set(paths))
