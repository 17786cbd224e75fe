"""Seam measure (diffusion/metrics/seams.py): a tiled image with offsets between its tiles shows a ratio well
above 1 at the tile period, a seamless one about 1."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion.metrics.seams import border_step_ratio


def test_seams_at_the_window_period():
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(rng.normal(0, 10, (128, 128)), 2)  # a seamless texture
    cols, rows = border_step_ratio(smooth, 32)
    assert 0.8 < cols < 1.25 and 0.8 < rows < 1.25
    tiled = smooth.copy()
    offsets = rng.normal(0, 2, (4, 4))  # every 32 px tile shifted by its own brightness
    tiled += np.kron(offsets, np.ones((32, 32)))
    cols, rows = border_step_ratio(np.stack([tiled] * 3, axis=2), 32)
    assert cols > 3 and rows > 3
    only_rows = smooth + np.kron(offsets[:, :1], np.ones((32, 128)))  # horizontal bands: rows only
    cols, rows = border_step_ratio(only_rows, 32)
    assert cols < 1.25 < 3 < rows
    with pytest.raises(ValueError, match="no window border"):
        border_step_ratio(smooth[:16, :16], 32)
