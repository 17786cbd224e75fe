"""Editing real images: img2img with a strength (SDEdit) and inpainting, for patches and whole slides.

SDEdit (Meng et al., ICLR 2022, Sec. 3): encode the image, noise its latents to the timestep where a fraction
`strength` of the sampler's steps is left, and run only those steps. strength 1 starts from pure noise (plain
generation, the image unused), strength -> 0 returns the image's VAE round trip.

Inpainting (the "blended latent diffusion" of Avrahami et al., 2023, Sec. 3): after every step, outside the mask
the latents are replaced by the image's latents noised to the next step's level, so the regenerated area is
denoised in the context of the kept one; at the end the kept latents are the image's own, and so are the kept
pixels up to the VAE round trip. The mask is dilated and ramped over a few latent px (`feather`), which blends
the border.

Noise levels follow the forward process of PixCell's schedule, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (1000 linear
betas 1e-4..0.02), computed here rather than by a scheduler's `add_noise` (whose index bookkeeping follows its
own begin index, not the timestep asked for). So editing takes the variance-preserving samplers only, whose
state is x_t itself: not euler-ancestral (sigma-scaled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EDIT_SAMPLERS = ("dpm-solver", "ddim", "sa-solver", "ddpm", "sde-dpm-solver", "lcm")
_BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ALPHAS_CUMPROD = torch.cumprod(1 - _BETAS, dim=0)  # the schedule of every PixCell sampler


def check_edit_sampler(sampler: str) -> None:
    if sampler not in EDIT_SAMPLERS:
        raise ValueError(
            f"img2img and inpainting take one of {', '.join(EDIT_SAMPLERS)}; got sampler {sampler!r}"
        )


def start_step(steps: int, strength: float) -> int:
    """The first of `steps` sampler steps that SDEdit runs: the last round(steps * strength) ones (one at least)."""
    if not 0 < strength <= 1:
        raise ValueError(f"`strength` {strength}: expected a number in (0, 1]")
    return steps - max(1, round(steps * strength))


def noised(x0: Tensor, noise: Tensor, t: Tensor | int | None) -> Tensor:
    """x0 taken to timestep t by the forward process; t None (past the last step): x0 itself."""
    if t is None:
        return x0
    a = ALPHAS_CUMPROD[int(t)].item()
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def latent_mask(mask: Tensor, size: tuple[int, int], feather: int = 2) -> Tensor:
    """A pixel mask (B, 1, H, W) in [0, 1] (1: regenerate) -> (B, 1, h, w) at latent size: a latent px is
    regenerated when any of its pixels is, and the mask is ramped to 0 over `feather` latent px outside."""
    m = (F.adaptive_max_pool2d(mask.float(), size) > 0.5).float()
    for i in range(feather):  # each ring outward weighs a little less: 1 - (i + 1) / (feather + 1)
        grown = F.max_pool2d(m.ceil(), 3, stride=1, padding=1)
        ring = (grown > 0) & (m == 0)
        m = torch.where(ring, torch.full_like(m, 1 - (i + 1) / (feather + 1)), m)
    return m
