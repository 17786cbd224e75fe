"""CAME's update for FSDP2 parameters (DTensors sharded on dim 0), with the math of `diffusion.training.came`.

CAME's factored statistics are means over rows and columns, and its update clipping uses the RMS of the whole
update: on a shard those are partial sums. Written with DTensor operations, the reductions over the sharded
dimension become collectives (DTensor's Partial -> Replicate), so each process keeps and updates only its rows:

- 2-D weight (R, C) sharded on rows: the row statistics (R,) are sharded like the weight; the column statistics
  (C,) are a mean over all rows, replicated on every process; the rank-1 estimate needs mean(row), a sum over
  the shards.
- >= 3-D: row (.., C_{-2}) and column (.., C_{-1}) statistics keep dim 0: sharded, with no collective.
- 1-D: elementwise, sharded.
- every tensor: RMS(update) is a sum of squares over the shards.

Means are taken as sum / count: FSDP2's shards are uneven when a dimension does not divide by the process count,
and a mean of local means would weigh them wrong. One tensor at a time (no buckets): a handful of collectives per
parameter. The state holds DTensors, so `torch.distributed.checkpoint` saves and reshards it like AdamW's.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor import zeros as dtensor_zeros
except ImportError:  # torch 2.4
    from torch.distributed._tensor import DTensor, Replicate
    from torch.distributed._tensor import zeros as dtensor_zeros


def _zeros(p: DTensor, shape: tuple[int, ...], replicated: bool = False) -> DTensor:
    """fp32 zeros on p's mesh: sharded like p (dim 0) or replicated."""
    placements = [Replicate()] * p.device_mesh.ndim if replicated else list(p.placements)
    return dtensor_zeros(shape, dtype=torch.float32, device_mesh=p.device_mesh, placements=placements)


def _mean(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    return x.sum(dim=dim, keepdim=keepdim) / x.shape[dim]


def _init_state(p: DTensor, state: dict) -> None:
    shape = tuple(p.shape)
    state.setdefault("step", 0)
    if "exp_avg" in state:
        return
    state["exp_avg"] = _zeros(p, shape)
    if len(shape) >= 2:
        row, col = shape[:-1], shape[:-2] + shape[-1:]
        two_d = len(shape) == 2  # the column statistics (C,) are a mean over the sharded rows: replicated
        state["exp_avg_sq_row"], state["exp_avg_res_row"] = _zeros(p, row), _zeros(p, row)
        state["exp_avg_sq_col"], state["exp_avg_res_col"] = _zeros(p, col, two_d), _zeros(p, col, two_d)
    else:
        state["exp_avg_sq"] = _zeros(p, shape)


@torch.no_grad()
def came_update_dtensor(p: DTensor, state: dict, group: dict) -> None:
    """One CAME step of the sharded parameter `p` (its .grad a DTensor of the same sharding), state in place."""
    b1, b2, b3 = group["betas"]
    e1, e2 = group["eps"]
    lr, wd = group["lr"], group["weight_decay"]
    _init_state(p, state)
    state["step"] += 1
    grad = p.grad.float()
    factored = grad.dim() >= 2

    update = grad.square() + e1
    if factored:
        state["exp_avg_sq_row"].mul_(b2).add_(_mean(update, -1), alpha=1.0 - b2)
        state["exp_avg_sq_col"].mul_(b2).add_(_mean(update, -2), alpha=1.0 - b2)
        update = _approx_rsqrt(state["exp_avg_sq_row"], state["exp_avg_sq_col"]) * grad
    else:
        state["exp_avg_sq"].mul_(b2).add_(update, alpha=1.0 - b2)
        update = state["exp_avg_sq"].rsqrt() * grad
    rms = (update.square().sum() / update.numel()).sqrt()
    update = update / (rms / group["clip_threshold"]).clamp(min=1.0)

    exp_avg = state["exp_avg"]
    exp_avg.mul_(b1).add_(update, alpha=1.0 - b1)
    if factored:  # confidence: the instability (update - exp_avg)^2, factored like the second moment
        res = (update - exp_avg).square() + e2
        state["exp_avg_res_row"].mul_(b3).add_(_mean(res, -1), alpha=1.0 - b3)
        state["exp_avg_res_col"].mul_(b3).add_(_mean(res, -2), alpha=1.0 - b3)
        update = _approx_rsqrt(state["exp_avg_res_row"], state["exp_avg_res_col"]) * exp_avg
    else:
        update = exp_avg

    if wd != 0:
        p.add_(p, alpha=-wd * lr)
    # The fp32 update goes into the parameter's dtype, rounded once (as came-pytorch does).
    p.sub_((update * lr).to(p.dtype))


def _approx_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """1 / sqrt of the rank-1 estimate row col^T / mean(row) of a factored second moment (Adafactor)."""
    r = (row / _mean(row, -1, keepdim=True)).rsqrt().unsqueeze(-1)
    return r * col.unsqueeze(-2).rsqrt()
