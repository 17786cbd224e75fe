"""Dense per-window conditions: every sliding window conditioned on the reference crop at its own position.

On a token grid (`large_image.window_conditions`) a window can only start on a token boundary, so a one-token
model (PixCell-256, window = one 256 px tile) steps by whole windows: its windows never overlap while denoising
and the region is a grid of visible squares. With a reference image the tokens need not come from a fixed grid:
window i at latent origin (y, x) takes the UNI embedding of the reference crop under it (pixels 8y .. 8y + 8w,
its m x m tiles for an m x m-token model), so windows can start anywhere, overlap by any amount, and the overlap
average of MultiDiffusion (large_image.py) blends neighbours whose conditions agree where they overlap. A stored
token grid (a `.npy` file, dataset features) keeps the tile-grid path: there is no image to crop from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .large_image import WindowLayout, default_dense_stride, dense_layout

__all__ = ["default_dense_stride", "dense_layout", "dense_window_conditions"]


@torch.no_grad()
def dense_window_conditions(
    image: Tensor,  # (3, H, W) reference image, uint8 or float in [0, 1], H = 8 * layout.height
    layout: WindowLayout,
    tokens_side: int,  # m: the model's tokens per side (1 for PixCell-256, 4 for PixCell-1024)
    embed_grid: Callable[..., Tensor],  # UNIEncoder.embed_grid: (B, 3, h, w), tile=px -> (B, m*m, C)
    factor: int = 8,  # image px per latent px (the VAE's)
    batch: int = 16,  # windows embedded per call
) -> Tensor:
    """(N_windows, m*m, C): window i's condition, the embedding of the reference crop it covers, row-major tiles."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"reference image: expected a (3, H, W) tensor, got {tuple(image.shape)}")
    if image.shape[1] != layout.height * factor or image.shape[2] != layout.width * factor:
        raise ValueError(
            f"reference image {image.shape[1]}x{image.shape[2]} px does not cover the {layout.height}x"
            f"{layout.width} latent region ({factor} px per latent px)"
        )
    px = layout.window * factor
    if px % tokens_side:
        raise ValueError(f"window of {px} px is not divisible by {tokens_side} tokens per side")
    crops = [
        image[:, y * factor : y * factor + px, x * factor : x * factor + px] for y, x in layout.positions
    ]
    out = [
        embed_grid(torch.stack(crops[i : i + batch]), tile=px // tokens_side).float().cpu()
        for i in range(0, len(crops), batch)
    ]
    return torch.cat(out)
