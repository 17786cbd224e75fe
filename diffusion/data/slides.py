"""Whole-slide images -> square patches at a target resolution, with a tissue filter.

Slides are read through openslide (or tiffslide), never a home-made TIFF reader. One slide is the unit of work:
`extract_slide` writes `<out>/<dataset>/<group>/single_<size>/<slide>/<row>_<col>.<ext>` (the published PixCell
layout; row/col are grid indices of the non-overlapping patch grid) plus `summary.json`, which marks the slide as
done. Every patch is written to a temporary name and renamed, so a crash never leaves a half-written patch, and a
re-run skips finished slides and the finished patches of an interrupted one.

Tissue filter: Otsu threshold on the HSV saturation of a thumbnail (H&E is saturated, glass is not), floored at
`min_saturation` so that a slide with no tissue is not split into "tissue" and "background" at noise level; a patch
is kept when the fraction of tissue pixels in its footprint is >= `min_tissue`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from diffusion.atomic import atomic_path

if TYPE_CHECKING:
    from openslide import OpenSlide
    from tiffslide import TiffSlide

IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpeg"}
SUMMARY_FILE = "summary.json"  # written last: its presence means the slide is complete
PARAMS_FILE = ".params.json"  # written first: a resumed slide must use the same parameters
MPP_KEYS = ("openslide.mpp-x", "tiffslide.mpp-x")
MPP_Y_KEYS = ("openslide.mpp-y", "tiffslide.mpp-y")
# Microscopy scans lie between ~0.1 um/px (100x oil) and a few um/px (2.5x); a plain TIFF's 72-dpi tags read
# as 352.8 um/px. Outside this range the metadata describes a print, not a scan, and tiling would be nonsense.
PLAUSIBLE_MPP = (0.05, 10.0)


class SlideError(ValueError):
    """A slide that cannot be tiled as asked (unreadable, no resolution metadata, smaller than one patch)."""


@dataclass(frozen=True)
class TilingParams:
    """What decides the output of one slide; a resumed slide must be extracted with the same values."""

    patch_size: int = 1024  # output patch side, px
    target_mpp: float = 0.5  # um/px of the output (20x = 0.5, 40x = 0.25)
    mpp_tolerance: float = 0.05  # a slide within 5% of target_mpp is read 1:1, without resampling
    min_tissue: float = 0.25  # fraction of the patch footprint that must be tissue
    min_saturation: int = 20  # floor of the Otsu threshold on saturation (0..255)
    image_format: str = "png"
    jpeg_quality: int = 95

    def __post_init__(self):
        if self.patch_size < 8:
            raise ValueError(f"patch size {self.patch_size}: expected at least 8 px")
        if self.target_mpp <= 0:
            raise ValueError(f"target mpp {self.target_mpp}: expected > 0 um/px")
        if not 0 <= self.min_tissue <= 1:
            raise ValueError(f"min tissue {self.min_tissue}: expected a fraction in [0, 1]")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {self.image_format!r}: expected one of {sorted(IMAGE_FORMATS)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg quality {self.jpeg_quality}: expected 1..100")

    @property
    def ext(self) -> str:
        return IMAGE_FORMATS[self.image_format]


@dataclass
class SlideJob:
    """One slide to tile and where its patches go."""

    path: str
    dataset: str
    group: str
    mpp: float | None = None  # overrides the slide's metadata (um/px at level 0)
    name: str | None = None  # default: file name without extension

    @property
    def slide_name(self) -> str:
        return self.name or Path(self.path).name.split(".")[0]

    def out_dir(self, root: str | Path, patch_size: int) -> Path:
        return Path(root) / self.dataset / self.group / f"single_{patch_size}" / self.slide_name


@dataclass
class SlideSummary:
    """Per-slide result, also saved as `summary.json` beside the patches."""

    slide: str
    path: str
    dataset: str
    group: str
    backend: str
    mpp: float  # level-0 um/px used
    mpp_source: str  # "metadata" or "--mpp"
    level0_step: int  # level-0 px covered by one patch
    grid: tuple[int, int]  # rows, cols of the patch grid
    otsu_threshold: float
    slide_tissue_fraction: float  # over the whole thumbnail
    patches_kept: int
    patches_written: int  # this run (the rest existed from an interrupted run)
    mean_tissue_fraction: float  # over kept patches
    seconds: float
    params: dict = field(default_factory=dict)
    patches: list = field(default_factory=list)  # [row, col, x0, y0, tissue_fraction]
    status: str = "extracted"  # "skipped" when a finished slide was found on disk


#################################################################################
#                                 Reading slides                                #
#################################################################################


def open_slide(path: str | Path, backend: str = "auto") -> tuple[OpenSlide | TiffSlide, str]:
    """Open a slide with openslide (default) or tiffslide; `auto` tries openslide, then tiffslide.

    Returns (slide, backend_name). Raises SlideError naming the file when neither can read it.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such slide file")
    if backend not in ("auto", "openslide", "tiffslide"):
        raise ValueError(f"slide backend {backend!r}: expected auto, openslide or tiffslide")
    errors = []
    for name in ("openslide", "tiffslide") if backend == "auto" else (backend,):
        try:
            if name == "openslide":
                import openslide

                return openslide.OpenSlide(str(path)), name
            import tiffslide

            return tiffslide.TiffSlide(str(path)), name
        except Exception as err:  # each library raises its own types (unsupported format, decoding errors)
            errors.append(f"{name}: {type(err).__name__}: {str(err).strip() or 'unreadable'}")
    raise SlideError(f"{path}: cannot open slide ({'; '.join(errors)})")


def check_mpp(mpp: float, source: str) -> float:
    """`mpp` when it is a plausible microscope resolution (PLAUSIBLE_MPP); SlideError naming `source` otherwise."""
    low, high = PLAUSIBLE_MPP
    if not low <= mpp <= high:
        raise SlideError(
            f"{source} says {mpp:g} um/px, outside the plausible range for a microscope scan ({low}-{high} "
            "um/px; a plain TIFF's 72-dpi tags read as 352.8): pass --mpp with the level-0 resolution (0.25 for "
            "a 40x scan, 0.5 for 20x)"
        )
    return mpp


def slide_mpp(slide: OpenSlide | TiffSlide, path: str | Path = "") -> float:
    """Level-0 microns per pixel from the slide's metadata; SlideError when it is absent."""
    props = slide.properties
    for kx, ky in zip(MPP_KEYS, MPP_Y_KEYS):
        if props.get(kx) not in (None, ""):
            mx = float(props[kx])
            my = float(props.get(ky) or mx)
            if mx <= 0 or not math.isfinite(mx):
                break
            if abs(mx - my) / mx > 0.01:  # anisotropic pixels would need a non-square read; refuse
                raise SlideError(
                    f"{path}: non-square pixels (mpp-x {mx}, mpp-y {my}); pass --mpp to force one"
                )
            return check_mpp(mx, f"{path}: the metadata ({kx})")
    raise SlideError(
        f"{path}: no microns-per-pixel in the slide metadata (openslide.mpp-x); pass --mpp with the level-0 "
        "resolution in um/px (0.25 for a 40x scan, 0.5 for 20x), or an mpp column in the manifest"
    )


def read_rgb(slide: OpenSlide | TiffSlide, x: int, y: int, level: int, size: int) -> Image.Image:
    """Read a size x size region at `level` whose top-left is (x, y) in level-0 px; transparent -> white."""
    region = slide.read_region((x, y), level, (size, size))
    if region.mode == "RGBA":
        # openslide returns transparent pixels outside the scanned area; they are background, i.e. white glass
        background = Image.new("RGBA", region.size, (255, 255, 255, 255))
        region = Image.alpha_composite(background, region)
    return region.convert("RGB")


#################################################################################
#                                 Tissue filter                                 #
#################################################################################


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (maximises the between-class variance of the histogram)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)  # pixels <= t
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(np.argmax(between))  # class 0 is <= t, so tissue is > t


def tissue_mask(thumbnail: Image.Image, min_saturation: int = 20) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an RGB thumbnail and the saturation threshold used (pixels with S > threshold)."""
    sat = np.asarray(thumbnail.convert("RGB").convert("HSV"))[..., 1]
    threshold = max(otsu_threshold(sat), float(min_saturation))
    return sat > threshold, threshold


def cell_fractions(
    mask: np.ndarray, shape: tuple[int, int], step: float, scale: tuple[float, float]
) -> np.ndarray:
    """Tissue fraction of every grid cell: (rows, cols) array.

    mask: tissue mask of a thumbnail; step: cell side in level-0 px; scale: (sy, sx) thumbnail px per level-0 px.
    An integral image gives each cell's sum in O(1).
    """
    rows, cols = shape
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    sy, sx = scale

    def edges(n: int, s: float, limit: int) -> np.ndarray:
        e = np.round(np.arange(n + 1) * step * s).astype(np.int64)
        return np.clip(e, 0, limit)

    ys, xs = edges(rows, sy, mask.shape[0]), edges(cols, sx, mask.shape[1])
    y0, y1 = ys[:-1, None], ys[1:, None]
    x0, x1 = xs[None, :-1], xs[None, 1:]
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((y1 - y0) * (x1 - x0), 1)
    return total / area


@dataclass
class SlideGrid:
    """Where the patches of one slide are, and which ones hold tissue."""

    mpp: float
    level0_step: int  # level-0 px per patch side
    read_level: int
    read_size: int  # px read at read_level (resized to patch_size when different)
    fractions: np.ndarray  # (rows, cols) tissue fraction per cell
    threshold: float
    slide_tissue_fraction: float

    def kept(self, min_tissue: float) -> list[tuple[int, int]]:
        """Grid cells with enough tissue, in row-major order."""
        rows, cols = np.nonzero(self.fractions >= min_tissue)
        return list(zip(rows.tolist(), cols.tolist()))


def plan_slide(slide: OpenSlide | TiffSlide, params: TilingParams, mpp: float) -> SlideGrid:
    """Compute the patch grid of a slide at `params.target_mpp` and the tissue fraction of each cell."""
    scale = params.target_mpp / mpp  # level-0 px per output px
    if abs(scale - 1) <= params.mpp_tolerance:
        scale = 1.0  # e.g. 0.499 um/px is read as 20x; resampling by 0.2% would only blur
    step = int(round(params.patch_size * scale))
    if step < 1:  # only reachable with an mpp far outside PLAUSIBLE_MPP; never divide by a zero step
        raise SlideError(
            f"slide at {mpp:g} um/px: a {params.patch_size} px patch at {params.target_mpp} um/px covers less "
            "than one level-0 pixel; check --mpp"
        )
    width, height = slide.dimensions
    rows, cols = height // step, width // step
    level = int(slide.get_best_level_for_downsample(scale)) if scale > 1 else 0
    read_size = int(round(step / float(slide.level_downsamples[level])))
    # thumbnail with ~16 px per patch side: enough to judge tissue, small enough for any slide
    down = max(step / 16.0, 1.0)
    thumb = slide.get_thumbnail((max(1, int(width / down)), max(1, int(height / down))))
    mask, threshold = tissue_mask(thumb, params.min_saturation)
    fractions = cell_fractions(mask, (rows, cols), step, (mask.shape[0] / height, mask.shape[1] / width))
    return SlideGrid(mpp, step, level, read_size, fractions, threshold, float(mask.mean()))


#################################################################################
#                                  Extraction                                   #
#################################################################################


def save_image(image: Image.Image, path: Path, params: TilingParams) -> None:
    """Write an image atomically (temporary name, then rename) in the chosen format."""
    with atomic_path(path) as tmp:
        if params.image_format == "png":
            image.save(tmp, format="PNG")
        else:
            image.save(tmp, format="JPEG", quality=params.jpeg_quality)


def extract_slide(
    job: SlideJob, out_root: str | Path, params: TilingParams, backend: str = "auto", progress: bool = False
) -> SlideSummary:
    """Tile one slide into `job.out_dir(out_root, patch_size)`; skip it when a matching summary exists.

    Returns the summary (read back from disk for a finished slide). Raises SlideError for slides that cannot be
    tiled and ValueError when a previous run of this slide used other parameters.
    """
    out_dir = job.out_dir(out_root, params.patch_size)
    wanted = asdict(params)
    summary_file, params_file = out_dir / SUMMARY_FILE, out_dir / PARAMS_FILE
    for f in (summary_file, params_file):
        if f.is_file():
            previous = json.loads(f.read_text()).get("params", {})
            if previous != wanted:
                diff = {k: (previous.get(k), v) for k, v in wanted.items() if previous.get(k) != v}
                raise ValueError(
                    f"{out_dir}: extracted before with other parameters {diff} (old, new); "
                    "delete that folder or write to another --out"
                )
    if summary_file.is_file():
        return SlideSummary(**{**json.loads(summary_file.read_text()), "status": "skipped"})

    t0 = time.perf_counter()
    slide, backend_name = open_slide(job.path, backend)
    try:
        mpp = check_mpp(float(job.mpp), "--mpp") if job.mpp is not None else slide_mpp(slide, job.path)
        grid = plan_slide(slide, params, mpp)
        if grid.fractions.size == 0:
            w, h = slide.dimensions
            raise SlideError(
                f"{job.path}: {w}x{h} px is smaller than one patch ({grid.level0_step} level-0 px)"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):  # left by a killed run (atomic_path cleans up otherwise)
            stale.unlink()
        with atomic_path(params_file) as tmp:
            tmp.write_text(json.dumps({"params": wanted}))

        kept = grid.kept(params.min_tissue)
        written = 0
        cells = kept
        if progress:
            from tqdm.auto import tqdm

            cells = tqdm(kept, desc=job.slide_name, unit="patch", leave=False)
        patches = []
        for row, col in cells:
            x0, y0 = col * grid.level0_step, row * grid.level0_step
            patches.append([row, col, x0, y0, round(float(grid.fractions[row, col]), 4)])
            target = out_dir / f"{row}_{col}{params.ext}"
            if target.is_file():  # finished by an interrupted run: patches are only ever renamed into place
                continue
            try:
                image = read_rgb(slide, x0, y0, grid.read_level, grid.read_size)
            except Exception as err:
                raise SlideError(
                    f"{job.path}: cannot read patch {row}_{col} ({type(err).__name__}: {err})"
                ) from None
            if image.size != (params.patch_size, params.patch_size):
                image = image.resize((params.patch_size, params.patch_size), Image.Resampling.LANCZOS)
            save_image(image, target, params)
            written += 1
    finally:
        slide.close()

    fracs = [p[4] for p in patches]
    summary = SlideSummary(
        slide=job.slide_name,
        path=str(job.path),
        dataset=job.dataset,
        group=job.group,
        backend=backend_name,
        mpp=mpp,
        mpp_source="--mpp" if job.mpp is not None else "metadata",
        level0_step=grid.level0_step,
        grid=tuple(grid.fractions.shape),
        otsu_threshold=grid.threshold,
        slide_tissue_fraction=round(grid.slide_tissue_fraction, 4),
        patches_kept=len(patches),
        patches_written=written,
        mean_tissue_fraction=round(float(np.mean(fracs)), 4) if fracs else 0.0,
        seconds=round(time.perf_counter() - t0, 3),
        params=wanted,
        patches=patches,
    )
    with atomic_path(summary_file) as tmp:
        tmp.write_text(json.dumps(asdict(summary), indent=1))
    return summary
