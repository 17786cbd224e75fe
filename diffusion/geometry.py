"""The geometry and latent normalisation PixCell is built on, in one place.

One UNI2-h token describes one 256x256 px tile (at 20x); the SD3.5 VAE downsamples by 8, so a tile is 32 latent
px. A model that takes T = m*m tokens makes images of m*256 px (PixCell-256: T = 1; PixCell-1024: T = 16).

Latent normalisation: the transformer works on `(z - shift) * scale` of the raw VAE latent z (SD3.5: shift 0.0609,
scale 1.5305, from the VAE's config). Its home for a trained model is the VAE config (sampling and validation
read it there); for a training run it is the metadata written beside the extracted features (`tools.
extract_features` records the VAE's values), and a run configured with other values stops at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

UNI_TILE = 256  # px per UNI token: one 256x256 tile at 20x
VAE_FACTOR = 8  # px per latent px (SD3.5 VAE, f8)
SD35_LATENT_SHIFT = 0.0609  # model latent = (z - shift) * scale (SD3.5 VAE config: shift_factor)
SD35_LATENT_SCALE = 1.5305  # (scaling_factor)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Images read as conditions, references, training pairs or evaluation inputs: sampling, virtual staining and
# evaluation read the same ones (lossless PNG/TIFF and JPEG; WebP and BMP are not read: convert them first).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


#################################################################################
#                             Tokens <-> image size                             #
#################################################################################


def tokens_side(num_tokens: int) -> int:
    """Tokens per side of a square grid of `num_tokens` (1 -> 1, 16 -> 4); ValueError when not square."""
    side = math.isqrt(num_tokens)
    if num_tokens < 1 or side * side != num_tokens:
        raise ValueError(f"UNI token count {num_tokens} is not a square grid")
    return side


def image_px_for_tokens(num_tokens: int) -> int:
    """Image side in px of a model taking `num_tokens` UNI tokens (1 -> 256, 16 -> 1024)."""
    return tokens_side(num_tokens) * UNI_TILE


def tokens_for_image_px(px: int, what: str = "image size") -> int:
    """UNI tokens of a square `px` image (256 -> 1, 1024 -> 16); ValueError when not whole tiles."""
    if px < UNI_TILE or px % UNI_TILE:
        raise ValueError(f"{what} {px}: expected a multiple of {UNI_TILE} px (one UNI token per tile)")
    return (px // UNI_TILE) ** 2


def crop_token_indices(grid: int | tuple[int, int], y: int, x: int, rows: int, cols: int) -> list[int]:
    """Row-major indices, into the flat token list of a (gh, gw) grid (or a square one of side `grid`), of the
    sub-grid of `rows` x `cols` tokens at token (y, x): the tokens of a crop (the published features are
    row-major over the tiles). Training crops and sampling conditions both select their tokens here."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if y < 0 or x < 0 or y + rows > gh or x + cols > gw:
        raise ValueError(f"crop of {rows}x{cols} tokens at ({y}, {x}) outside a {gh}x{gw} grid")
    return [(y + i) * gw + (x + j) for i in range(rows) for j in range(cols)]


#################################################################################
#                              Latent normalisation                             #
#################################################################################


def latent_norm(vae: AutoencoderKL) -> tuple[float, float]:
    """(shift, scale) from a diffusers VAE's config: model latent = (z - shift) * scale."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(shift), float(vae.config.scaling_factor)


def to_model_latents(z: Tensor, shift: float, scale: float) -> Tensor:
    """Raw VAE latent -> the transformer's space."""
    return (z - shift) * scale


def from_model_latents(x: Tensor, shift: float, scale: float) -> Tensor:
    """The transformer's space -> raw VAE latent."""
    return x / scale + shift


def norm_record(shift: float, scale: float) -> dict[str, float]:
    """The metadata keys that record a latent normalisation beside extracted features."""
    return {"vae_shift": float(shift), "vae_scale": float(scale)}


def recorded_norm(meta: Mapping) -> tuple[float, float] | None:
    """(shift, scale) recorded in feature metadata, or None for features written before they were recorded."""
    if "vae_shift" not in meta or "vae_scale" not in meta:
        return None
    return float(meta["vae_shift"]), float(meta["vae_scale"])


def same_norm(a: tuple[float, float], b: tuple[float, float]) -> bool:
    # Configs and JSON round values (the demo's stand-in VAE: 6 decimals); a real mismatch is far larger.
    return all(math.isclose(u, v, rel_tol=1e-5, abs_tol=1e-6) for u, v in zip(a, b))


def resolve_norm(
    configured: tuple[float | None, float | None],
    recorded: tuple[float, float] | None,
    where: str,
) -> tuple[float, float]:
    """The (shift, scale) a training run uses: the configured values, else the recorded ones, else SD3.5's.

    A configured pair that differs from what the features recorded is a one-line ValueError: the model would
    otherwise learn latents in one normalisation and be sampled (through the VAE's config) in another.
    """
    shift, scale = configured
    if (shift is None) != (scale is None):
        raise ValueError(f"config: set both vae_shift and vae_scale, or neither (got {shift}, {scale})")
    if shift is None:
        return recorded if recorded is not None else (SD35_LATENT_SHIFT, SD35_LATENT_SCALE)
    if recorded is not None and not same_norm((shift, scale), recorded):
        raise ValueError(
            f"{where}: latents normalised by a VAE with shift {recorded[0]:g}, scale {recorded[1]:g}, but the config "
            f"sets vae_shift={shift:g}, vae_scale={scale:g} (remove both from the config to use the features' "
            "values, or extract the features again with the run's VAE)"
        )
    return float(shift), float(scale)
