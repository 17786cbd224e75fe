"""Label-preserving augmentation: a labelled image folder as a condition source for the sampling runner.

    DATA/<class>/<any/depth/>image.png  ->  OUT/<class>/<any/depth/>image_<k>.png, k = 0 .. n-1

Each real image conditions n synthetic variants through its own UNI2-h tokens (computed on the fly, like
`FolderSource`), so a variant keeps the class of its source image: the augmentation protocol of the PixCell
paper (Sec. 4.3, Fig. 3c). Variants differ only by their seed (`name_seed(seed, name)`), so the sampling
runner's resume and sharding guarantees hold unchanged (`diffusion.sampling.runner.sample_patches`).

How many variants: `per_image` for every image, or `per_class_total` synthetic images per class, spread as
evenly as possible over the class's images (small classes get more per image: class balancing).
Image size: every image must have the model's size, unless `fit` says how to get there: "resize" (whole
image, bilinear with antialiasing) or "crop" (central square of the model's size).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion.geometry import IMAGE_SUFFIXES
from diffusion.sampling.conditions import FolderSource, Loaded, Spec, read_image

FITS = ("none", "resize", "crop")


def class_folders(root: str | Path, flag: str = "DATA") -> dict[str, list[Path]]:
    """{class: sorted image files} of a labelled folder `root/<class>/...`; one-line errors for an empty class
    folder, images outside class folders, or no class at all. Hidden files and folders are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {root}: no such folder")
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if stray:
        raise ValueError(
            f"{flag} {root}: images directly inside ({stray[0]}, ...); expected {flag}/<class>/<image>"
        )
    out: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            f
            for f in folder.rglob("*")
            if f.is_file()
            and f.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(root).parts)
        )
        if not files:
            raise ValueError(f"{flag} {folder}: class folder '{folder.name}' holds no images")
        out[folder.name] = files
    if not out:
        raise ValueError(f"{flag} {root}: no class folders (expected {flag}/<class>/<image>)")
    return out


def variant_counts(n_images: int, per_image: int | None, per_class_total: int | None) -> list[int]:
    """Variants for each of a class's `n_images` images: `per_image` each, or `per_class_total` spread evenly
    (the first `total % n` images get one more)."""
    if (per_image is None) == (per_class_total is None):
        raise ValueError("give exactly one of `per_image` and `per_class_total`")
    if per_image is not None:
        if per_image < 1:
            raise ValueError(f"`per_image` {per_image}: expected >= 1")
        return [per_image] * n_images
    if per_class_total < 1:
        raise ValueError(f"`per_class_total` {per_class_total}: expected >= 1")
    base, extra = divmod(per_class_total, n_images)
    return [base + (i < extra) for i in range(n_images)]


def fit_image(image: np.ndarray, size: int, fit: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) by the `fit` policy (see the module doc)."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    if fit == "resize":
        return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, reducing_gap=None))
    if fit == "crop":
        y, x = (h - size) // 2, (w - size) // 2
        return np.ascontiguousarray(image[y : y + size, x : x + size])
    raise ValueError(f"{h}x{w} px image, expected {size}x{size}")


class ClassFolderSource(FolderSource):
    """Conditions from a labelled folder: n variants per image, named `<class>/<relative stem>_<k>`."""

    kind = "labelled images"

    def __init__(
        self,
        tokens_side: int,
        tile: int,
        root: str | Path,
        channels: int | None = None,
        per_image: int | None = None,
        per_class_total: int | None = None,
        fit: str = "none",
    ):
        if fit not in FITS:
            raise ValueError(f"fit={fit!r}: expected one of {', '.join(FITS)}")
        self.classes = class_folders(root)
        super().__init__(tokens_side, tile, [root], channels)  # self.files: {"<class>/<stem>": file}
        self.root, self.fit = Path(root), fit
        self.size = tokens_side * tile  # the model's image size
        self.counts = {
            cls: dict(zip(files, variant_counts(len(files), per_image, per_class_total)))
            for cls, files in self.classes.items()
        }
        self._check_sizes()

    def describe(self) -> str:
        n = sum(len(f) for f in self.classes.values())
        return f"{n} labelled image(s) in {len(self.classes)} class(es)"

    def run_info(self) -> dict:
        return {"fit": self.fit}

    def _check_sizes(self) -> None:
        """All images one size (the model's, or any with a fit policy); the first offender named in one line."""
        sizes = self.sizes()
        for size in sizes.values():
            if not isinstance(size, tuple):
                raise ValueError(str(size))
        first_stem, first = next(iter(sizes.items()))
        if self.fit == "none":
            for stem, size in sizes.items():
                if size != first:
                    raise ValueError(
                        f"DATA {self.root}: mismatched image sizes ({self.files[first_stem].name} is "
                        f"{first[0]}x{first[1]} px, {self.files[stem].name} {size[0]}x{size[1]}); give images of one "
                        "size or a size policy (`resize` / `crop`)"
                    )
            if first != (self.size, self.size):
                raise ValueError(
                    f"DATA {self.root}: images are {first[0]}x{first[1]} px, the model makes {self.size} px images; "
                    "choose `resize` or `crop`, or use the model of that size"
                )
        elif self.fit == "crop":
            for stem, (h, w) in sizes.items():
                if min(h, w) < self.size:
                    raise ValueError(
                        f"{self.files[stem]}: {h}x{w} px, too small for `crop` to {self.size} px"
                    )

    def specs(self, skipped: list[str] | None = None) -> list[Spec]:
        out = []
        for stem, file in self.files.items():
            cls = stem.split("/", 1)[0]
            for k in range(self.counts[cls][file]):
                src = {"type": "image", "file": str(file), "class": cls, "variant": k, "fit": self.fit}
                out.append(Spec(f"{stem}_{k}", stem, 0, 0, self.m, self.m, False, src))
        return out

    def load(self, spec: Spec) -> Loaded:
        return Loaded(None, fit_image(read_image(self.files[spec.entry]), self.size, self.fit))


def variant_source(key: str, real_keys: Sequence[str] | set[str]) -> str | None:
    """The real image key a synthetic key `<class>/<stem>_<k>` was made from, if it is in `real_keys`."""
    stem, sep, k = key.rpartition("_")
    return stem if sep and k.isdigit() and stem in real_keys else None
