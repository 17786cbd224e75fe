"""Pyramidal tiled BigTIFF slides (what OpenSlide, tiffslide and QuPath open), written in bounded memory.

Layout: Aperio SVS's, the one layout that OpenSlide, tiffslide (through tifffile's `_series_svs`) and QuPath all
read with its resolution: page 0 the full-resolution image in 256 px tiles, whose ImageDescription starts with
`Aperio` and carries `AppMag = 20|MPP = 0.5` (OpenSlide's `openslide.objective-power` and `openslide.mpp-x`,
tiffslide's `tiffslide.mpp-x`); page 1 a small stripped thumbnail (SVS's convention: OpenSlide lists it as an
associated image, tifffile as the `Thumbnail` series); pages 2.. the reduced levels, each half the size of the
one before, tiled, NewSubfileType 0 (tifffile stops a SVS pyramid at the first page marked reduced). The TIFF
resolution tags carry the same MPP (pixels per centimetre), for readers that ignore the description. A generic
tiled TIFF would lose the magnification (OpenSlide's generic-tiff reader reads no objective power).

Memory: levels are built one from the other by 2x2 box averaging, band by band, through `DiskArray`s (so a
32,768^2 px slide never sits in memory), and tifffile takes each level's tiles from an iterator. Checked with
tifffile 2026.3.3, openslide-python 1.4.7 on OpenSlide 4.0.1, tiffslide 3.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_path
from .disk import DiskArray

TILE = 256  # px per TIFF tile (and per Deep Zoom tile)
COMPRESSIONS = ("jpeg", "deflate")


def level_shapes(height: int, width: int, smallest: int = TILE) -> list[tuple[int, int]]:
    """(h, w) of each pyramid level: halved (rounded up) until the level fits in one `smallest` px tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > smallest:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def downsample_level(src: DiskArray, dst: DiskArray, band: int = TILE) -> None:
    """dst = src halved by 2x2 box averaging (edge rows / columns of an odd side repeated), `band` rows at once
    (integer sums: a band costs 2 bytes per source value)."""
    h, w = src.shape[:2]
    for y in range(0, h, band):
        block = src.read(y, y + band)
        if block.shape[0] % 2:
            block = np.concatenate([block, block[-1:]], axis=0)
        if block.shape[1] % 2:
            block = np.concatenate([block, block[:, -1:]], axis=1)
        total = block[0::2, 0::2].astype(np.uint16)
        total += block[1::2, 0::2]
        total += block[0::2, 1::2]
        total += block[1::2, 1::2]
        dst.write(y // 2, ((total + 2) // 4).astype(np.uint8))


def _tiles(level: DiskArray, tile: int = TILE) -> Iterator[np.ndarray]:
    """The level's tiles, row-major, each (tile, tile, 3) (edge tiles zero-padded, as TIFF stores them)."""
    h, w = level.shape[:2]
    for y in range(0, h, tile):
        rows = level.read(y, y + tile)
        for x in range(0, w, tile):
            out = np.zeros((tile, tile, 3), np.uint8)
            part = rows[:, x : x + tile]
            out[: part.shape[0], : part.shape[1]] = part
            yield out


def aperio_description(width: int, height: int, mpp: float, magnification: float, note: str = "") -> str:
    """The ImageDescription OpenSlide and tifffile recognise as Aperio SVS: 'Aperio ...|AppMag = 20|MPP = 0.5'."""
    fields = [
        f"Aperio Image Library (PixCell) \r\n{width}x{height} ({TILE}x{TILE})",
        f"AppMag = {magnification:g}",
        f"MPP = {mpp:.6g}",
    ]
    if note:
        fields.append(f"Title = {note.replace('|', '/')}")
    return "|".join(fields)


def write_pyramid(
    level0: DiskArray,  # (H, W, 3) uint8 full-resolution pixels
    path: str | Path,  # the .tif / .svs to write (through a temporary name)
    mpp: float = 0.5,  # micrometres per pixel at level 0 (20x: ~0.5)
    magnification: float = 20.0,  # objective power of level 0
    compression: str = "jpeg",  # 'jpeg' (quality 90) or 'deflate' (lossless)
    quality: int = 90,
    note: str = "",  # a title for the description (what made it)
    work: str | Path | None = None,  # folder for the reduced levels' DiskArrays (default: beside `path`)
) -> list[tuple[int, int]]:
    """Write `level0` as a pyramidal tiled BigTIFF in Aperio SVS layout -> the (h, w) of each level written."""
    import tifffile

    if compression not in COMPRESSIONS:
        raise ValueError(f"TIFF compression {compression!r}: expected one of {', '.join(COMPRESSIONS)}")
    if not mpp > 0:
        raise ValueError(f"mpp {mpp}: expected > 0 micrometres per pixel")
    path = Path(path)
    work = Path(work) if work is not None else path.parent / f".{path.name}.levels"
    h, w = level0.shape[:2]
    shapes = level_shapes(h, w)
    levels = [level0]
    for i, (lh, lw) in enumerate(shapes[1:], start=1):
        levels.append(DiskArray(work / f"level{i}.npy", (lh, lw, 3), "uint8"))
        downsample_level(levels[-2], levels[-1])
    # The thumbnail: the first level at most 1024 px on a side, resized to fit 768 px (Aperio's size).
    small = next(lv for lv in levels if max(lv.shape[:2]) <= 1024)
    thumb = Image.fromarray(small.read(0, small.shape[0]))
    thumb.thumbnail((768, 768))
    codec = ("jpeg", {"level": quality}) if compression == "jpeg" else ("zlib", {"level": 6})
    common = dict(photometric="rgb", dtype="uint8", metadata=None)
    desc = aperio_description(w, h, mpp, magnification, note)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, level in enumerate(levels):
            scale = 2**i
            tif.write(
                _tiles(level),
                shape=(*level.shape[:2], 3),
                tile=(TILE, TILE),
                compression=codec[0],
                compressionargs=codec[1],
                # MPP in the TIFF resolution tags too: pixels per centimetre (1 cm = 1e4 um).
                resolution=(1e4 / (mpp * scale), 1e4 / (mpp * scale)),
                resolutionunit="CENTIMETER",
                description=desc if i == 0 else f"Aperio Image Library (PixCell) level {i}",
                **common,
            )
            if i == 0:
                tif.write(np.asarray(thumb), description="Aperio Image Library (PixCell) thumbnail", **common)
    for level in levels[1:]:
        level.path.unlink(missing_ok=True)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    return shapes
