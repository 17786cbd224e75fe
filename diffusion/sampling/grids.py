"""UNI token grids for regions and whole slides: the editable grid file, and grids from real slides.

A token grid is an (Gh, Gw, C) float32 array, one UNI2-h embedding per 256 px tile at 20x (row-major like the
published features); NaN rows are holes (tiles without a token: background that a feature tool skipped). It is
stored as a plain `.npy` file, so numpy is all a user needs to edit one; `TokenGrid` adds the edits people ask
for, each returning a new grid:

    g = TokenGrid.load("slide_a.npy")
    g = g.crop(0, 0, 64, 64)                                   # tokens rows 0..63, cols 0..63
    g = g.paste(TokenGrid.load("slide_b.npy").crop(10, 10, 8, 8), 20, 20)   # another slide's tumour, here
    g = g.blend(TokenGrid.load("slide_c.npy").crop(0, 0, 64, 64), 0.3)      # 70% g, 30% the other
    g = TokenGrid.load("patch.npy").repeat(4, 4)               # a 4 x 4 mosaic of one grid
    g.fill_holes("nearest").save("edited.npy")

Sources of grids (each returns a TokenGrid):

    grid_from_slide     a real slide (openslide / tiffslide) read at 20x (0.5 um/px) in 256 px tiles, UNI2-h on
                        the fly, one token row at a time (memory: one row of tiles)
    grid_from_features  the patch-feature `.h5` of TRIDENT or CLAM, read as they write it: datasets `features`
                        (N, C) and `coords` (N, 2) with each patch's level-0 (x, y) top-left corner. Checked
                        against TRIDENT (mahmoodlab/TRIDENT, `trident/IO.py` coords_to_h5 and `WSI.
                        extract_patch_features`, commit ac5f46e of WSI.py: `coords` attributes patch_size,
                        patch_size_level0, level0_magnification, target_magnification, overlap) and CLAM
                        (mahmoodlab/CLAM `extract_features_fp.py`, commit 14fbcc4: no attributes in the feature
                        file, so the patch pitch is taken from the coordinates). Patches must be 256 px at 20x
                        (TRIDENT's options mag 20, patch_size 256; CLAM's patch_size 256 on a 20x level) and not
                        overlap: other sizes describe other tiles than PixCell's tokens, and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..atomic import atomic_path
from ..geometry import UNI_TILE

if TYPE_CHECKING:
    from openslide import OpenSlide
    from tiffslide import TiffSlide

    from ..encoders import UNIEncoder

TARGET_MPP = 0.5  # 20x: the resolution of PixCell's 256 px tiles


@dataclass(frozen=True)
class TokenGrid:
    """(Gh, Gw, C) float32 UNI tokens, NaN rows for holes. Edits return new grids; nothing is changed in place."""

    tokens: np.ndarray

    def __post_init__(self):
        t = np.asarray(self.tokens, dtype=np.float32)
        if t.ndim != 3 or min(t.shape) < 1:
            raise ValueError(f"token grid: expected shape (rows, cols, channels), got {t.shape}")
        object.__setattr__(self, "tokens", t)

    # ------------------------------------------------------------------ file

    @classmethod
    def load(cls, path: str | Path) -> TokenGrid:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such grid file")
        try:
            tokens = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{path}: not a .npy token grid ({err})") from None
        if tokens.ndim != 3:
            raise ValueError(
                f"{path}: a token grid is (rows, cols, channels), this file holds {tokens.shape}"
            )
        return cls(tokens)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, self.tokens)
        return path

    # ------------------------------------------------------------------ shape

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape[0], self.tokens.shape[1]

    @property
    def channels(self) -> int:
        return self.tokens.shape[2]

    @property
    def holes(self) -> np.ndarray:
        """(Gh, Gw) bool: tiles without a token."""
        return ~np.isfinite(self.tokens).all(axis=2)

    def check(self, channels: int, what: str = "token grid") -> TokenGrid:
        """This grid when the model can take it: `channels` per token, no holes (fill them first)."""
        if self.channels != channels:
            raise ValueError(f"{what}: {self.channels} channels per token, the model takes {channels}")
        if self.holes.any():
            raise ValueError(
                f"{what}: {int(self.holes.sum())} tiles without a token (NaN); fill them first "
                "(TokenGrid.fill_holes, or the tool's fill option)"
            )
        return self

    # ------------------------------------------------------------------ edits

    def crop(self, row: int, col: int, rows: int, cols: int) -> TokenGrid:
        """Tokens rows row..row+rows, cols col..col+cols (must lie inside the grid)."""
        gh, gw = self.shape
        if row < 0 or col < 0 or rows < 1 or cols < 1 or row + rows > gh or col + cols > gw:
            raise ValueError(f"crop of {rows}x{cols} tokens at ({row}, {col}) outside a {gh}x{gw} grid")
        return TokenGrid(self.tokens[row : row + rows, col : col + cols].copy())

    def paste(self, other: TokenGrid, row: int, col: int) -> TokenGrid:
        """This grid with `other` pasted with its top-left token at (row, col) (must fit inside)."""
        gh, gw = self.shape
        oh, ow = other.shape
        if other.channels != self.channels:
            raise ValueError(f"paste: {other.channels} channels into a grid of {self.channels}")
        if row < 0 or col < 0 or row + oh > gh or col + ow > gw:
            raise ValueError(f"paste of {oh}x{ow} tokens at ({row}, {col}) does not fit a {gh}x{gw} grid")
        out = self.tokens.copy()
        out[row : row + oh, col : col + ow] = other.tokens
        return TokenGrid(out)

    def blend(self, other: TokenGrid, weight: float | np.ndarray) -> TokenGrid:
        """(1 - weight) * self + weight * other, token by token; `weight` a number or a (Gh, Gw) map in [0, 1]."""
        if other.tokens.shape != self.tokens.shape:
            raise ValueError(f"blend: grids of {self.tokens.shape} and {other.tokens.shape}")
        w = np.asarray(weight, np.float32)
        if w.ndim == 2:
            if w.shape != self.shape:
                raise ValueError(f"blend: weight map {w.shape} for a {self.shape} grid")
            w = w[..., None]
        elif w.ndim != 0:
            raise ValueError("blend: weight must be a number or a (rows, cols) map")
        if not np.isfinite(w).all() or w.min() < 0 or w.max() > 1:
            raise ValueError("blend: weights must lie in [0, 1]")
        return TokenGrid((1 - w) * self.tokens + w * other.tokens)

    def repeat(self, rows: int, cols: int) -> TokenGrid:
        """The grid tiled `rows` x `cols` times."""
        if rows < 1 or cols < 1:
            raise ValueError(f"repeat {rows}x{cols}: expected >= 1 each way")
        return TokenGrid(np.tile(self.tokens, (rows, cols, 1)))

    def fill_holes(self, how: str = "nearest") -> TokenGrid:
        """Holes filled: 'nearest' (the closest tile's token) or 'mean' (the mean token of the grid)."""
        holes = self.holes
        if not holes.any():
            return self
        if holes.all():
            raise ValueError("token grid: every tile is a hole; nothing to fill from")
        out = self.tokens.copy()
        if how == "mean":
            out[holes] = self.tokens[~holes].mean(axis=0)
        elif how == "nearest":
            from scipy.ndimage import distance_transform_edt

            _, (iy, ix) = distance_transform_edt(holes, return_indices=True)
            out = out[iy, ix]
        else:
            raise ValueError(f"fill {how!r}: expected 'nearest' or 'mean'")
        return TokenGrid(out)


#################################################################################
#                         Grids from feature files (.h5)                        #
#################################################################################


def _pitch(values: np.ndarray) -> int | None:
    """The spacing of a lattice of coordinates: gcd of the gaps between sorted distinct values."""
    gaps = np.diff(np.unique(values))
    gaps = gaps[gaps > 0]
    return int(np.gcd.reduce(gaps.astype(np.int64))) if gaps.size else None


def grid_from_features(
    path: str | Path,
    slide_mpp: float | None = None,  # level-0 um/px, to check a CLAM file's pitch (TRIDENT records its own)
) -> tuple[TokenGrid, dict]:
    """A TRIDENT / CLAM patch-feature `.h5` -> (grid with holes where no patch was kept, info).

    info: origin (x, y) and pitch of the grid in level-0 px, and the format seen ('trident' or 'clam')."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feature file")
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not an HDF5 file ({err})") from None
    with fh:
        for key in ("features", "coords"):
            if key not in fh:
                raise KeyError(
                    f"{path}: no '{key}' dataset (expected TRIDENT/CLAM patch features: features, coords)"
                )
        feats = np.asarray(fh["features"], np.float32)
        coords = np.asarray(fh["coords"])
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh["coords"].attrs.items()}
    if feats.ndim == 3 and feats.shape[0] == 1:  # some writers keep a leading batch axis
        feats = feats[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2 or coords.shape != (feats.shape[0], 2):
        raise ValueError(
            f"{path}: features {feats.shape} and coords {coords.shape}: expected (N, C) and (N, 2)"
        )
    if feats.shape[0] == 0:
        raise ValueError(f"{path}: no patches")
    kind = "trident" if "patch_size_level0" in attrs else "clam"
    if kind == "trident":
        size, mag = int(attrs.get("patch_size", 0)), attrs.get("target_magnification")
        if size != UNI_TILE or (mag is not None and float(mag) != 20):
            raise ValueError(
                f"{path}: patches of {size} px at {mag}x; PixCell's tokens are {UNI_TILE} px tiles at 20x (TRIDENT's "
                "mag 20 and patch_size 256)"
            )
        if int(attrs.get("overlap", 0) or 0):
            raise ValueError(
                f"{path}: overlapping patches (overlap {attrs['overlap']}); extract with overlap 0"
            )
        pitch = int(attrs["patch_size_level0"])
    else:
        px, py = _pitch(coords[:, 0]), _pitch(coords[:, 1])
        pitch = px or py
        if pitch is None:
            raise ValueError(
                f"{path}: one patch only; cannot tell the patch pitch (a CLAM file records none)"
            )
        if px and py and px != py:
            raise ValueError(
                f"{path}: patches {px} px apart across and {py} px down; expected a square lattice"
            )
        if slide_mpp is not None and not math.isclose(pitch * slide_mpp, UNI_TILE * TARGET_MPP, rel_tol=0.02):
            raise ValueError(
                f"{path}: patches every {pitch} level-0 px = {pitch * slide_mpp:g} um; PixCell's tokens are "
                f"{UNI_TILE} px at 20x = {UNI_TILE * TARGET_MPP:g} um"
            )
    x0, y0 = coords[:, 0].min(), coords[:, 1].min()
    cols = (coords[:, 0] - x0) / pitch
    rows = (coords[:, 1] - y0) / pitch
    if not (np.allclose(cols, np.round(cols)) and np.allclose(rows, np.round(rows))):
        raise ValueError(f"{path}: patch corners are not on a {pitch} px lattice")
    cols, rows = np.round(cols).astype(int), np.round(rows).astype(int)
    grid = np.full((rows.max() + 1, cols.max() + 1, feats.shape[1]), np.nan, np.float32)
    grid[rows, cols] = feats
    info = {"format": kind, "origin": [int(x0), int(y0)], "pitch": pitch, "patches": int(feats.shape[0])}
    return TokenGrid(grid), info


#################################################################################
#                       Grids from slides (UNI2-h on the fly)                   #
#################################################################################


def slide_tiles_at_20x(
    slide: OpenSlide | TiffSlide,
    mpp: float,
    region: tuple[int, int, int, int] | None = None,  # (x, y, width, height) in level-0 px; None: whole slide
) -> tuple[int, int, Callable[[int], np.ndarray]]:
    """(rows, cols, read_row): the 20x tile lattice of a slide region, and a reader of one row of tiles as
    (cols, 256, 256, 3) uint8, read at the pyramid level closest above 20x and resized."""
    from PIL import Image

    from ..data.slides import read_rgb

    scale = TARGET_MPP / mpp  # level-0 px per 20x px
    width0, height0 = slide.dimensions
    x, y, w, h = region or (0, 0, width0, height0)
    if x < 0 or y < 0 or w < 1 or h < 1 or x + w > width0 or y + h > height0:
        raise ValueError(f"region {x},{y} {w}x{h}: outside the slide ({width0}x{height0} level-0 px)")
    step = UNI_TILE * scale  # level-0 px per tile
    # A region given in whole 20x tiles at a nominal 0.5 um/px is a hair short at 0.499 um/px: 0.5% slack.
    rows, cols = int(h / step * 1.005), int(w / step * 1.005)
    if rows < 1 or cols < 1:
        raise ValueError(f"region {w}x{h} level-0 px holds no 256 px tile at 20x ({step:g} level-0 px)")
    level = slide.get_best_level_for_downsample(scale)
    down = slide.level_downsamples[level]
    size = int(round(step / down))

    def read_row(r: int) -> np.ndarray:
        out = np.empty((cols, UNI_TILE, UNI_TILE, 3), np.uint8)
        for c in range(cols):
            tile = read_rgb(slide, int(round(x + c * step)), int(round(y + r * step)), level, size)
            if size != UNI_TILE:
                tile = tile.resize((UNI_TILE, UNI_TILE), Image.BICUBIC)
            out[c] = np.asarray(tile)
        return out

    return rows, cols, read_row


@torch.no_grad()
def grid_from_slide(
    slide_path: str | Path,
    uni: UNIEncoder,  # diffusion.encoders.load_uni
    region: tuple[int, int, int, int] | None = None,
    mpp: float | None = None,  # level-0 um/px; None: from the slide's metadata
    batch_size: int = 64,
    progress: bool = False,
) -> TokenGrid:
    """UNI2-h tokens of a slide region at 20x, one row of 256 px tiles at a time."""
    from tqdm.auto import tqdm

    from ..data.slides import check_mpp, open_slide
    from ..data.slides import slide_mpp as read_mpp

    slide, _ = open_slide(slide_path)
    mpp = check_mpp(mpp, "the mpp given") if mpp is not None else read_mpp(slide, slide_path)
    rows, cols, read_row = slide_tiles_at_20x(slide, mpp, region)
    device = next(uni.parameters()).device
    out = np.empty((rows, cols, uni.embed_dim), np.float32)
    for r in tqdm(range(rows), desc="UNI tokens", disable=not progress, leave=False):
        tiles = torch.from_numpy(read_row(r)).permute(0, 3, 1, 2)  # (cols, 3, 256, 256) uint8
        feats = [uni(tiles[i : i + batch_size].to(device)) for i in range(0, cols, batch_size)]
        out[r] = torch.cat(feats).cpu().numpy()
    return TokenGrid(out)
