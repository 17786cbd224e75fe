"""The demo generator's training crops (diffusion/demo/crops.py): any offset, 8 orientations, tissue only, and
never a pixel from the held-out rows."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from diffusion.data.slides import open_slide, read_rgb
from diffusion.demo.crops import dihedral_array, write_training_crops


def test_dihedral_array_gives_the_eight_orientations():
    a = np.arange(12).reshape(3, 4, 1)
    seen = {dihedral_array(a, k).tobytes() + bytes(dihedral_array(a, k).shape) for k in range(8)}
    assert len(seen) == 8


def test_crops_come_from_the_training_rows(real_slide, tmp_path):
    paths = write_training_crops(real_slide, tmp_path, count=12, limit_y=1024, size=128, seed=3)
    assert 10 <= len(paths) <= 12 and all(p.suffix == ".png" for p in paths)
    slide, _ = open_slide(real_slide)
    offsets = set()
    for p in paths:
        y, x, k = map(int, re.fullmatch(r"y(\d+)_x(\d+)_d(\d)", p.stem).groups())
        assert y + 128 <= 1024  # above the held-out rows
        offsets.add((y % 256, x % 256))
        crop = np.asarray(Image.open(p))
        source = np.asarray(read_rgb(slide, x, y, 0, 128))
        assert np.array_equal(crop, dihedral_array(source, k))
        assert (np.asarray(Image.fromarray(source).convert("HSV"))[..., 1] > 20).mean() >= 0.5
    assert len(offsets) > 5  # not on the tile grid
    again = write_training_crops(real_slide, tmp_path / "again", count=12, limit_y=1024, size=128, seed=3)
    assert [p.name for p in again] == [p.name for p in paths]
