"""CAME (Luo et al., ACL 2023), the optimizer PixArt-sigma and PixCell train with, over many tensors at once.

Why not just `came_pytorch.CAME`: that implementation (kept as the reference: `optimizer.foreach=False`, and the
equivalence test in tests/diffusion/training/test_came.py) loops over the parameters in Python and runs ~32 small kernels per
tensor. PixCell-XL has 603 parameter tensors, so one step is ~19k kernel launches, and the H100 benchmark of a
full 256 px training step spent more time in the optimizer than in forward + backward (10% MFU against 24% with
AdamW). Here parameters of one shape are stacked and updated together (a handful of shapes in a DiT: on a GPU
PixCell-XL's 603 tensors make 22 buckets and 772 ops per step; `benchmarks/bench_optim.py`), with the same math,
the same state keys per parameter, and so the same checkpoints: a state saved by came-pytorch loads here and the
other way round.

The update, per parameter p with gradient g (betas b1, b2, b3; eps e1, e2; clip threshold d; lr; weight decay):

    u      = g^2 + e1
    v      = EMA_b2(u)              factored over rows and columns for >= 2-D tensors (Adafactor), else elementwise
    u      = g / sqrt(v);   u /= max(1, RMS(u) / d)
    m      = EMA_b1(u)
    s      = EMA_b3((u - m)^2 + e2) factored (>= 2-D only: 1-D tensors step with m alone)
    p     <- p - lr * wd * p - lr * m / sqrt(s)

The optimizer state of one bucket is one stacked buffer per state key; every parameter's state entry is a view into
it, so `state_dict()` and `load_state_dict()` see the per-parameter layout of came-pytorch. A loaded (or otherwise
replaced) state is packed into buffers again at the next step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .came_sharded import came_update_dtensor

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # torch 2.4
    from torch.distributed._tensor import DTensor

# Largest bucket, in elements: bounds the step's temporaries (about 5 fp32 copies of one bucket). On a GPU, big
# buckets mean few kernel launches (PixCell-XL: 22 buckets). On a CPU a step is bound by memory traffic, and
# temporaries above glibc's mmap threshold (32 MB) are mapped and faulted in afresh by every op: there 16 MB
# buckets (2^22 fp32 elements) measured fastest, 1.5-1.9 s per PixCell-XL step on 2 cores against 5-9 s with 2^26
# and 2-5 s for came-pytorch's loop (interleaved runs in one process).
MAX_BUCKET_NUMEL = {"cuda": 1 << 26, "cpu": 1 << 22}


class CAME(torch.optim.Optimizer):
    """CAME with came-pytorch's arguments and state, updating each bucket of same-shape tensors at once."""

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        max_bucket_numel: int | None = None,  # default: MAX_BUCKET_NUMEL of the parameters' device type
    ):
        if not lr > 0.0:
            raise ValueError(f"CAME: lr must be > 0, got {lr}")
        if len(betas) != 3 or not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"CAME: betas must be three values in [0, 1], got {betas}")
        if len(eps) != 2:
            raise ValueError(f"CAME: eps takes two values, got {eps}")
        self.max_bucket_numel = max_bucket_numel
        defaults = dict(
            lr=lr,
            eps=tuple(eps),
            clip_threshold=clip_threshold,
            betas=tuple(betas),
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        # bucket (parameter ids) -> (stacked state buffers, per-parameter views of them)
        self._packed: dict[tuple[int, ...], tuple[dict[str, Tensor], dict[str, list[Tensor]]]] = {}

    @staticmethod
    def _state_shapes(shape: torch.Size) -> dict[str, tuple[int, ...]]:
        """State keys of one parameter and their shapes (came-pytorch's names)."""
        shape = tuple(shape)
        if len(shape) >= 2:
            row, col = shape[:-1], shape[:-2] + shape[-1:]
            return {
                "exp_avg": shape,
                "exp_avg_sq_row": row,
                "exp_avg_sq_col": col,
                "exp_avg_res_row": row,
                "exp_avg_res_col": col,
            }
        return {"exp_avg": shape, "exp_avg_sq": shape}

    def _buckets(self, params: list[Tensor]) -> list[list[Tensor]]:
        """Parameters grouped by (shape, dtype, device), each group cut to at most `max_bucket_numel` elements."""
        groups: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            groups[(tuple(p.shape), p.dtype, p.device)].append(p)
        buckets = []
        for (_, _, device), members in groups.items():
            cap = self.max_bucket_numel or MAX_BUCKET_NUMEL.get(device.type, MAX_BUCKET_NUMEL["cuda"])
            per = max(1, cap // max(1, members[0].numel()))
            buckets += [members[i : i + per] for i in range(0, len(members), per)]
        return buckets

    def _stacked(self, bucket: list[Tensor]) -> dict[str, Tensor]:
        """The bucket's stacked state buffers, (k, *shape) fp32; packs (or creates) them when the per-parameter
        state entries are not views into them (first step, after load_state_dict)."""
        key = tuple(id(p) for p in bucket)
        packed = self._packed.get(key)
        if packed is not None and all(
            self.state[p].get(name) is view[i]
            for name, view in packed[1].items()
            for i, p in enumerate(bucket)
        ):
            return packed[0]
        buffers, device = {}, bucket[0].device
        for name, shape in self._state_shapes(bucket[0].shape).items():
            parts = []
            for p in bucket:
                old = self.state[p].get(name)
                if old is not None and tuple(old.shape) != shape:
                    raise ValueError(f"CAME state {name}: shape {tuple(old.shape)} does not match {shape}")
                parts.append(old if old is not None else torch.zeros(shape, device=device))
            buffers[name] = torch.stack([t.to(device, torch.float32) for t in parts])
        views = {name: list(buf.unbind(0)) for name, buf in buffers.items()}
        for i, p in enumerate(bucket):
            state = self.state[p]
            state.setdefault("step", 0)
            state.pop("RMS", None)  # came-pytorch stores the parameter RMS each step and never reads it
            for name, view in views.items():
                state[name] = view[i]
        # A bucket that changed (a parameter without a gradient this step) drops its old buffers.
        members = set(key)
        self._packed = {k: v for k, v in self._packed.items() if not members.intersection(k)}
        self._packed[key] = (buffers, views)
        return buffers

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("CAME does not support sparse gradients")
            # FSDP2 shards parameters as DTensors: their factored statistics need reductions over the shards,
            # one tensor at a time (came_sharded.py); the plain tensors step in buckets.
            sharded = [p for p in params if isinstance(p, DTensor)]
            for p in sharded:
                came_update_dtensor(p, self.state[p], group)
            params = [p for p in params if not isinstance(p, DTensor)]
            for bucket in self._buckets(params):
                self._update(bucket, group)
        return loss

    def _update(self, bucket: list[Tensor], group: dict) -> None:
        b1, b2, b3 = group["betas"]
        e1, e2 = group["eps"]
        lr, wd = group["lr"], group["weight_decay"]
        state = self._stacked(bucket)
        for p in bucket:
            self.state[p]["step"] += 1
        k, numel = len(bucket), bucket[0].numel()
        factored = bucket[0].dim() >= 2
        grad = torch.stack([p.grad for p in bucket]).float()  # (k, *shape)
        per_tensor = (k,) + (1,) * bucket[0].dim()  # broadcast shape of one scalar per tensor

        update = grad.square().add_(e1)
        if factored:
            state["exp_avg_sq_row"].mul_(b2).add_(update.mean(dim=-1), alpha=1.0 - b2)
            state["exp_avg_sq_col"].mul_(b2).add_(update.mean(dim=-2), alpha=1.0 - b2)
            update = _approx_rsqrt(state["exp_avg_sq_row"], state["exp_avg_sq_col"]).mul_(grad)
        else:
            state["exp_avg_sq"].mul_(b2).add_(update, alpha=1.0 - b2)
            update = state["exp_avg_sq"].rsqrt().mul_(grad)
        del grad
        rms = update.reshape(k, -1).norm(dim=1).div_(math.sqrt(numel))
        update.div_(rms.div_(group["clip_threshold"]).clamp_(min=1.0).view(per_tensor))

        exp_avg = state["exp_avg"]
        exp_avg.mul_(b1).add_(update, alpha=1.0 - b1)
        if factored:  # confidence: the instability (update - exp_avg)^2, factored like the second moment
            res = update.sub_(exp_avg).square_().add_(e2)
            state["exp_avg_res_row"].mul_(b3).add_(res.mean(dim=-1), alpha=1.0 - b3)
            state["exp_avg_res_col"].mul_(b3).add_(res.mean(dim=-2), alpha=1.0 - b3)
            del res, update
            update = _approx_rsqrt(state["exp_avg_res_row"], state["exp_avg_res_col"]).mul_(exp_avg)
        else:
            update = exp_avg.clone()

        params = list(bucket)
        if wd != 0:
            torch._foreach_add_(params, params, alpha=-wd * lr)
        update.mul_(lr)
        # The fp32 update goes into the parameter's dtype, rounded once (as came-pytorch does).
        torch._foreach_sub_(params, list(update.unbind(0)))


def _approx_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """1 / sqrt of the rank-1 estimate row col^T / mean(row) of a factored second moment (Adafactor)."""
    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return r * col.unsqueeze(-2).rsqrt()
