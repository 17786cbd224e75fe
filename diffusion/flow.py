"""Rectified flow (Liu et al. 2022; flow matching, Lipman et al. 2023) on token vectors: the pieces shared by the
virtual-staining flow MLP (`virtual_staining/flow_mlp.py`, H&E tokens -> IHC tokens) and the UNI embedding prior
(`diffusion/prior/`, noise -> UNI tokens).

    x_t = t * x1 + (1 - t) * x0,  t ~ U(0, 1),  target velocity v = x1 - x0
    loss = || f(x_t, 999 t) - v ||^2                 (mean over every element)
    x1_hat = Euler integration of dx/dt = f(x, 999 t) from t = 0 (x0) to t = 1

Timesteps enter the networks as 999 * t, the scale the published flow MLP was trained on. The residual block is
the RDM-style "SimpleMLP" block of the published virtual-staining checkpoints (its key names are part of that
format, `../shared/formats/flow_mlp_keys.json`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

# Timesteps enter the network as 999 * t (the published flow MLP was trained on that scale).
TIME_SCALE = 999.0


#################################################################################
#                                 Helpers                                       #
#################################################################################


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim): cos half then sin half (the LDM/ADM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_init(module: nn.Linear) -> nn.Linear:
    """Zero-initialised output layers: every block starts as the identity, the whole net as v = 0."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """x + out_layers(in_layers(x) + emb_layers(emb)); `out_layers` starts at zero."""

    def __init__(self, channels: int, mid_channels: int, emb_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(channels), nn.SiLU(), nn.Linear(channels, mid_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, mid_channels))
        self.out_layers = nn.Sequential(
            nn.LayerNorm(mid_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init(nn.Linear(mid_channels, channels)),
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # (N, C), (N, E) -> (N, C)
        return x + self.out_layers(self.in_layers(x) + self.emb_layers(emb))


#################################################################################
#                          Objective and integration                            #
#################################################################################


def flow_matching_loss(
    velocity: Callable[..., Tensor],
    x0: Tensor,  # (N, ...) source points (H&E tokens, or Gaussian noise)
    x1: Tensor,  # (N, ...) target points paired with them
    generator: torch.Generator | None = None,
    **cond: Tensor | None,  # passed on to `velocity` (e.g. labels)
) -> Tensor:
    """Rectified-flow loss with one t ~ U(0, 1) per row: mean || v(x_t, 999 t) - (x1 - x0) ||^2.

    `velocity` is the (possibly DDP-wrapped) model, so gradients synchronise through its forward.
    """
    t = torch.rand(x0.shape[0], device=x0.device, generator=generator, dtype=x0.dtype)
    tb = t.view(-1, *([1] * (x0.ndim - 1)))
    xt = tb * x1 + (1 - tb) * x0
    pred = velocity(xt, TIME_SCALE * t, **cond)
    return ((pred.float() - (x1 - x0).float()) ** 2).mean()


def euler_integrate(
    velocity: Callable[[Tensor, Tensor], Tensor],  # (x, 999 t (N,)) -> dx/dt, same shape as x
    x: Tensor,  # (N, ...) the points at t = 0
    steps: int,
    progress: bool = False,
    desc: str = "flow",
    times: Sequence[float] | None = None,  # where the velocity is evaluated (t in [0, 1]); default i / steps
) -> Tensor:
    """Euler steps of dt = 1 / steps: by default left-point on the uniform grid t_i = i / steps, i = 0 .. steps-1
    (the points at t = 1); `times` evaluates the velocity elsewhere (the flow MLP's "clipped" grid)."""
    if steps < 1:
        raise ValueError(f"flow steps must be >= 1, got {steps}")
    dt = 1.0 / steps
    times = [i * dt for i in range(steps)] if times is None else list(times)
    if len(times) != steps:
        raise ValueError(f"flow: {len(times)} times for {steps} steps")
    for i in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        t = torch.full((x.shape[0],), TIME_SCALE * times[i], device=x.device)
        x = x + dt * velocity(x, t)
    return x
