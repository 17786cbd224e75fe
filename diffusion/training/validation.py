"""The one validation grid of every trainer: columns of images side by side, one row per held-out condition.

A trainer chooses its columns (real | sample for PixCell and LoRA, mask | reference | samples for the
ControlNet, real | teacher | student for distillation); the samples of each column come from `sample_column`,
with fixed noise so that grids of successive validations compare image for image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..encoders import decode_latents, to_uint8
from ..geometry import to_model_latents
from ..sampling.pipeline import PixCellPipeline
from ..sampling.samplers import make_scheduler


def fixed_noise(transformer: torch.nn.Module, n: int, seed: int, device: torch.device) -> Tensor:
    """(n, C, s, s) Gaussian latents from `seed` on the CPU generator: the same on every device and run."""
    c = transformer.config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=gen).to(device)


@torch.no_grad()
def sample_column(
    pipe: torch.nn.Module,  # a PixCellPipeline or PixCellControlNetPipeline
    uni: Tensor,  # (n, T, C) conditions
    latents: Tensor,  # (n, C, s, s) fixed noise
    guidance_scale: float,
    num_inference_steps: int,
    **kwargs: object,  # what the pipeline takes beside (mask, controlnet_conditioning_scale, generator)
) -> np.ndarray:
    """uint8 (n, H, W, 3): one sample per condition from the given noise, without a progress bar."""
    images = pipe(
        uni,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        latents=latents,
        output_type="pt",
        progress=False,
        **kwargs,
    ).images
    return to_uint8(images)


def validation_grid(columns: Sequence[np.ndarray | Sequence[np.ndarray]]) -> np.ndarray:
    """Rows of the columns side by side: each column holds one uint8 (H, W, 3) image per row, all of one size.
    -> uint8 (rows * H, len(columns) * W, 3)."""
    rows = {len(c) for c in columns}
    if len(rows) != 1:
        raise ValueError(f"validation grid: columns of {sorted(rows)} images; expected one length")
    return np.concatenate(
        [np.concatenate([np.asarray(c[i]) for c in columns], axis=1) for i in range(rows.pop())], axis=0
    )


@torch.no_grad()
def held_out_grid(
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    held_out: Sequence[dict],  # {"uni": (T, C), "real": uint8 (H, W, 3) | None, "latent": stored latent}
    latent_norm: tuple[float, float],  # the run's (vae_shift, vae_scale)
    guidance_scale: float,
    num_inference_steps: int,
    seed: int,
) -> np.ndarray:
    """Rows of [real | EMA sample] for fixed held-out conditions and fixed noise seeds: uint8 (N*H, 2*W, 3).
    A held-out sample without a readable image shows the VAE reconstruction of its stored latent instead."""
    device = next(transformer.parameters()).device
    pipe = PixCellPipeline(transformer=transformer, vae=vae, scheduler=make_scheduler("dpm-solver"))
    uni = torch.stack([h["uni"] for h in held_out]).to(device)
    noise = fixed_noise(transformer, len(held_out), seed, device)
    fake = sample_column(pipe, uni, noise, guidance_scale, num_inference_steps)
    reals = []
    for h in held_out:
        real = h["real"]
        if real is None:
            z = to_model_latents(h["latent"][None], *latent_norm).to(device)
            real = to_uint8(decode_latents(vae, z))[0]
        reals.append(real)
    return validation_grid([reals, fake])
