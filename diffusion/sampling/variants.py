"""Synthetic variants of one reference patch, and where a reference comes from (an upload or a slide tile).

    ref = read_reference("tile.png", size=256)                # Reference: (256, 256, 3) uint8 + a note
    out = make_variants(pipe, uni, ref.image, n=4, seed=0)    # N images, their seeds, UNI cosine to the reference

A variant is PixCell sampled on the reference's own UNI2-h tokens (one per 256 px tile) with its own seed,
seed + i, through the pipeline, seeded the way `tools/sample.py` seeds an image (its own CPU generator for the
initial and the sampler's noise). Its similarity to the reference is measured in the same UNI space: the
cosine of each tile's token with the reference tile's token, averaged over the tiles.

This is the unit of work of the app (`tools/app.py`); it is library code so that a notebook can call it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from ..data.slides import TilingParams, open_slide, plan_slide, read_rgb, slide_mpp
from ..encoders import UNIEncoder, to_uint8
from ..geometry import UNI_TILE, image_px_for_tokens
from ..metrics.distances import paired_cosine
from .pipeline import PixCellPipeline
from .runner import initial_noise
from .samplers import resolve_sampling, sampler_name

#################################################################################
#                                  References                                   #
#################################################################################


MIN_TISSUE = 0.3  # a tile with less tissue than this is "background" (the demo tiles at the same threshold)


class ReferenceImageError(ValueError):
    """A reference image that cannot be used; the message is for the user (it names the file, says why)."""


@dataclass
class Reference:
    image: np.ndarray  # (S, S, 3) uint8
    note: str = ""  # what was done to make it fit ("" when used as it came)


def reference_size(pipe: PixCellPipeline) -> int:
    """Side in px of the H&E image a model's condition describes: one UNI token per 256 px tile (T = 1: 256 px,
    T = 16: 1024 px). Not always the generated size: the tiny test models make smaller images."""
    return image_px_for_tokens(pipe.transformer.config.caption_num_tokens)


def fit_reference(image: np.ndarray, size: int, name: str) -> Reference:
    """A (H, W, 3) uint8 image as a size x size reference: as is, centre-cropped when larger, refused when
    smaller (upscaling would change the magnification the model was trained at: 0.5 um/px)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ReferenceImageError(
            f"{name}: {w}x{h} px is too small; this model needs a {size}x{size} px H&E patch at 20x "
            f"(one UNI tile is {UNI_TILE} px)"
        )
    if h == w == size:
        return Reference(image)
    y, x = (h - size) // 2, (w - size) // 2
    return Reference(
        np.ascontiguousarray(image[y : y + size, x : x + size]),
        f"the central {size}x{size} px of {name}, a {w}x{h} px image",
    )


def read_reference(path: str | Path, size: int, name: str | None = None) -> Reference:
    """An image file as a reference (see `fit_reference`); ReferenceImageError, naming `name` (default: the file
    name), when it is not an image, is truncated or damaged, or is too small."""
    name = name or Path(path).name
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later inside the model
            image = np.array(im.convert("RGB"))
    except Image.DecompressionBombError:
        raise ReferenceImageError(
            f"{name}: too many pixels for an H&E patch; upload a {size}x{size} px crop"
        ) from None
    except Image.UnidentifiedImageError:
        raise ReferenceImageError(
            f"{name}: not an image file; expected a PNG, JPEG or TIFF H&E patch"
        ) from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's decoders raise all three on damaged data
        reason = str(err).replace(str(path), name) or type(err).__name__
        raise ReferenceImageError(f"{name}: damaged or truncated image ({reason})") from None
    return fit_reference(image, size, name)


@dataclass
class SlideTile:
    image: np.ndarray  # (S, S, 3) uint8
    row: int
    col: int
    x: int  # level-0 px of the top-left corner
    y: int
    tissue: float  # fraction of the tile that is tissue (the tiling's filter)

    def describe(self, slide_name: str) -> str:
        return f"{slide_name}, tile row {self.row} col {self.col} (level-0 x={self.x}, y={self.y})"


class SlideTiles:
    """A slide as a grid of non-overlapping `size` px tiles at 20x (0.5 um/px), with a thumbnail to pick from.

    The grid and the tissue fractions are those of the patch extraction (`diffusion.data.slides.plan_slide`),
    so a picked tile is the patch `tools/extract_patches.py` would have cut there.
    """

    def __init__(self, path: str | Path, size: int, thumb_side: int = 640, mpp: float | None = None):
        self.path = Path(path)
        self.slide, _ = open_slide(self.path)
        self.size = size
        self.params = TilingParams(patch_size=size, min_tissue=0.0)
        self.grid = plan_slide(self.slide, self.params, mpp or slide_mpp(self.slide, self.path))
        rows, cols = self.grid.fractions.shape
        if rows == 0 or cols == 0:
            raise ValueError(f"{self.path}: smaller than one {size} px tile at 20x")
        width, height = self.slide.dimensions
        self.scale = thumb_side / max(width, height)  # thumbnail px per level-0 px
        self.thumbnail = self.slide.get_thumbnail((round(width * self.scale), round(height * self.scale)))
        self.thumbnail = self.thumbnail.convert("RGB")

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.fractions.shape

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, col) of the tile under thumbnail point (x, y), or None outside the grid."""
        step = self.grid.level0_step * self.scale
        row, col = int(y // step), int(x // step)
        rows, cols = self.shape
        return (row, col) if 0 <= row < rows and 0 <= col < cols else None

    def tile(self, row: int, col: int) -> SlideTile:
        g = self.grid
        x, y = col * g.level0_step, row * g.level0_step
        image = read_rgb(self.slide, x, y, g.read_level, g.read_size)
        if image.size != (self.size, self.size):  # a slide at another resolution, resampled to 20x
            image = image.resize((self.size, self.size), Image.LANCZOS)
        return SlideTile(np.asarray(image), row, col, x, y, float(g.fractions[row, col]))

    def draw(self, selected: tuple[int, int] | None = None, min_tissue: float = MIN_TISSUE) -> Image.Image:
        """The thumbnail with the tissue tiles outlined (thin) and the selected one in a thick frame."""
        im = self.thumbnail.copy()
        draw = ImageDraw.Draw(im)
        step = self.grid.level0_step * self.scale
        rows, cols = self.shape
        for r in range(rows):
            for c in range(cols):
                if self.grid.fractions[r, c] >= min_tissue:
                    draw.rectangle([c * step, r * step, (c + 1) * step, (r + 1) * step], outline=(90, 90, 90))
        if selected is not None:
            r, c = selected
            box = [c * step, r * step, (c + 1) * step, (r + 1) * step]
            draw.rectangle(box, outline=(0, 160, 255), width=max(2, round(step / 16)))
        return im


#################################################################################
#                                    Variants                                   #
#################################################################################


@dataclass
class Variants:
    """N variants of one reference; images (N, s, s, 3) uint8 as a list, one seed and one cosine each."""

    images: list[np.ndarray]
    seeds: list[int]
    cosine: list[float]  # mean over tiles of the UNI-space cosine to the reference tile
    sampler: str
    steps: int
    guidance: float
    reference_tokens: np.ndarray = field(repr=False)  # (T, C) the condition


def embed_reference(uni: UNIEncoder, images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] or uint8 -> (B, T, C) UNI tokens, one per 256 px tile of a size px image.

    Generated images are resized to `size` first when the model makes another size (only the tiny test models
    do: the published ones make exactly the reference's size, so this is then a no-op)."""
    device = next(uni.parameters()).device
    images = images.to(device)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = images.float() / 255 if images.dtype == torch.uint8 else images
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return uni.embed_grid(images).float()


@torch.no_grad()
def _at_model_size(image: np.ndarray, px: int) -> Tensor:
    """(S, S, C) uint8 -> (1, C, px, px) float in [0, 1]."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    if pixels.shape[-1] != px:
        pixels = F.interpolate(pixels, size=(px, px), mode="bilinear", antialias=True)
    return pixels


def make_variants(
    pipe: PixCellPipeline,
    uni: UNIEncoder,
    reference: np.ndarray,  # (S, S, 3) uint8, S = reference_size(pipe)
    n: int = 4,
    sampler: str = "dpm-solver",
    steps: int | None = None,  # None: the sampler's default (20 for DPM-Solver++)
    guidance: float | None = None,  # None: the published default for the model (2.0 at 256 px, 1.2 at 1024)
    seed: int = 0,
    progress: bool = True,
    strength: float = 1.0,  # img2img (SDEdit): below 1, each variant starts from the noised reference
    mask: np.ndarray | None = None,  # inpainting: (S, S) uint8, 255 = redraw, 0 = keep the reference
) -> Variants:
    """Sample `n` variants of `reference` conditioned on its UNI tokens; variant i has seed `seed + i`. With
    `strength` below 1 the variants start from the reference itself, noised to that fraction of the schedule
    (SDEdit), so they keep its layout and redraw its detail. With a `mask` only its white part is redrawn and
    the rest is the reference's own pixels (inpainting, blended at the border).

    Switches the pipeline's sampler when another is asked for (callers that share one pipeline run one
    request at a time: the app's queue does).
    """
    size = reference_size(pipe)
    if reference.shape != (size, size, 3) or reference.dtype != np.uint8:
        raise ValueError(
            f"reference: expected a ({size}, {size}, 3) uint8 image, got {reference.shape} {reference.dtype}"
        )
    if n < 1:
        raise ValueError(f"n: expected at least 1 variant, got {n}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if not 0 < strength <= 1:  # NaN fails too
        raise ValueError(f"strength: expected 0 < strength <= 1, got {strength}")
    if sampler_name(pipe.scheduler) != sampler:
        pipe.set_sampler(sampler)
    options = resolve_sampling(sampler, steps, guidance, pipe.transformer.config.caption_num_tokens)
    tokens = embed_reference(uni, torch.tensor(reference).permute(2, 0, 1)[None], size)  # (1, T, C)
    seeds = [seed + i for i in range(n)]
    cfg = pipe.transformer.config
    noise, gens = initial_noise(seeds, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    edit: dict = {}
    if mask is not None and mask.shape != (size, size):
        raise ValueError(f"mask: expected a ({size}, {size}) image like the reference, got {mask.shape}")
    if (
        strength < 1 or mask is not None
    ):  # at the model's image size (the tiny test models make smaller images)
        edit = {
            "image": _at_model_size(reference, pipe.image_size).expand(n, -1, -1, -1),
            "strength": strength,
        }
    if mask is not None:
        edit["mask_image"] = _at_model_size(mask[..., None], pipe.image_size).expand(n, -1, -1, -1)
    images = pipe(
        tokens.expand(n, -1, -1).cpu(),
        options=options,
        generator=gens,
        latents=noise,
        output_type="pt",
        progress=progress,
        **edit,
    ).images  # (N, 3, s, s) in [0, 1]
    syn = embed_reference(uni, images, size).cpu().numpy()  # (N, T, C)
    ref = tokens[0].cpu().numpy()
    cosine = [float(paired_cosine(ref, s).mean()) for s in syn]
    return Variants(list(to_uint8(images)), seeds, cosine, sampler, options.steps, options.guidance, ref)
