"""Token grids: the editing API (crop, paste, blend, repeat, fill), TRIDENT and CLAM feature files read as those
tools write them, and one-line errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from diffusion.sampling.grids import TokenGrid, grid_from_features


def tokens(rows: int, cols: int, channels: int = 6, seed: int = 0) -> TokenGrid:
    return TokenGrid(np.random.default_rng(seed).standard_normal((rows, cols, channels)).astype(np.float32))


def test_edits_touch_only_what_they_say(tmp_path):
    a, b = tokens(8, 10), tokens(4, 4, seed=1)
    pasted = a.paste(b, 2, 3)
    assert np.array_equal(pasted.tokens[2:6, 3:7], b.tokens)
    outside = np.ones((8, 10), bool)
    outside[2:6, 3:7] = False
    assert np.array_equal(pasted.tokens[outside], a.tokens[outside]) and np.array_equal(
        a.tokens, tokens(8, 10).tokens
    )
    assert np.array_equal(a.crop(1, 2, 3, 4).tokens, a.tokens[1:4, 2:6])
    assert np.allclose(
        a.blend(tokens(8, 10, seed=2), 0.25).tokens, 0.75 * a.tokens + 0.25 * tokens(8, 10, seed=2).tokens
    )
    ramp = np.linspace(0, 1, 10)[None].repeat(8, 0)
    blended = a.blend(tokens(8, 10, seed=2), ramp)
    assert np.allclose(blended.tokens[:, 0], a.tokens[:, 0]) and np.allclose(
        blended.tokens[:, -1], tokens(8, 10, seed=2).tokens[:, -1]
    )
    assert a.repeat(2, 3).shape == (16, 30) and np.array_equal(a.repeat(2, 3).tokens[8:, 20:], a.tokens)
    assert np.array_equal(TokenGrid.load(a.save(tmp_path / "g.npy")).tokens, a.tokens)
    holes = a.tokens.copy()
    holes[0, 0] = np.nan
    filled = TokenGrid(holes).fill_holes("nearest")
    assert filled.holes.sum() == 0 and np.array_equal(filled.tokens[1:, 1:], a.tokens[1:, 1:])
    with pytest.raises(ValueError, match="crop of 3x4 tokens at \\(6, 2\\) outside a 8x10 grid"):
        a.crop(6, 2, 3, 4)
    with pytest.raises(ValueError, match="does not fit"):
        a.paste(b, 6, 0)
    with pytest.raises(ValueError, match="weights must lie in"):
        a.blend(a, 1.5)
    with pytest.raises(ValueError, match="1 tiles without a token"):
        TokenGrid(holes).check(6)
    with pytest.raises(ValueError, match="6 channels per token, the model takes 1536"):
        a.check(1536)


def write_h5(path, feats, coords, attrs=None) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        d = f.create_dataset("coords", data=coords)
        for k, v in (attrs or {}).items():
            d.attrs[k] = v


def test_trident_and_clam_feature_files(tmp_path):
    rng = np.random.default_rng(0)
    # A 40x slide (level-0 0.25 um/px): 256 px at 20x = 512 level-0 px per patch; tissue at 5 of the 3 x 3 tiles.
    cells = [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)]
    coords = np.array([(1000 + c * 512, 2000 + r * 512) for r, c in cells], np.int32)  # (x, y) level 0
    feats = rng.standard_normal((5, 8)).astype(np.float32)
    trident = {
        "patch_size": 256,
        "patch_size_level0": 512,
        "level0_magnification": 40,
        "target_magnification": 20,
        "overlap": 0,
        "name": "case",
    }  # as trident/IO.py coords_to_h5 writes them
    write_h5(tmp_path / "trident.h5", feats, coords, trident)
    write_h5(tmp_path / "clam.h5", feats, coords)  # CLAM's extract_features_fp.py: no attributes
    for name, kind in (("trident", "trident"), ("clam", "clam")):
        grid, info = grid_from_features(tmp_path / f"{name}.h5", slide_mpp=0.25 if kind == "clam" else None)
        assert info["format"] == kind and info["pitch"] == 512 and info["origin"] == [1000, 2000]
        assert grid.shape == (3, 3) and int(grid.holes.sum()) == 4
        for i, (r, c) in enumerate(cells):
            assert np.array_equal(grid.tokens[r, c], feats[i])
    write_h5(tmp_path / "224.h5", feats, coords, {**trident, "patch_size": 224})
    with pytest.raises(
        ValueError, match="patches of 224 px at 20x; PixCell's tokens are 256 px tiles at 20x"
    ):
        grid_from_features(tmp_path / "224.h5")
    with pytest.raises(ValueError, match="patches every 512 level-0 px = 256 um"):
        grid_from_features(tmp_path / "clam.h5", slide_mpp=0.5)
    with h5py.File(tmp_path / "nofeat.h5", "w") as f:
        f.create_dataset("coords", data=coords)
    with pytest.raises(KeyError, match="no 'features' dataset"):
        grid_from_features(tmp_path / "nofeat.h5")
