"""Optimizer and learning-rate schedule from a config's `optimizer` and `lr_schedule` dicts.

    optimizer   = dict(type="CAME", lr=2e-5, weight_decay=0.0, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    optimizer   = dict(type="CAME", lr=2e-5, foreach=False)               # came-pytorch's own per-tensor loop
    optimizer   = dict(type="AdamW", lr=1e-4, weight_decay=0.03, betas=(0.9, 0.999), eps=1e-8)
    lr_schedule = dict(type="constant", warmup_steps=1000)        # PixArt/PixCell: linear warm-up, then constant
    lr_schedule = dict(type="cosine", warmup_steps=1000, min_lr_ratio=0.0)

CAME (Luo et al. 2023, the optimizer PixArt-sigma and PixCell train with): by default the multi-tensor
implementation in `diffusion.training.came` (same math and state as the `came-pytorch` package, a few hundred
kernels per step instead of ~30 per parameter tensor); `foreach=False` selects `came_pytorch.CAME` itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("AdamW", "CAME")
LR_SCHEDULES = ("constant", "cosine")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Mapping) -> torch.optim.Optimizer:
    """AdamW (torch) or CAME (came-pytorch) from `cfg` = dict(type=..., lr=..., **optimizer kwargs)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("optimizer: no trainable parameters")
    if kind == "AdamW":
        allowed = {"lr", "weight_decay", "betas", "eps", "fused", "foreach"}
        _check_keys(cfg, allowed, kind)
        if "betas" in cfg:
            cfg["betas"] = tuple(cfg["betas"])
        return torch.optim.AdamW(params, **cfg)
    if kind == "CAME":
        allowed = {"lr", "weight_decay", "betas", "eps", "clip_threshold", "foreach", "max_bucket_numel"}
        _check_keys(cfg, allowed, kind)
        for key, n in (("betas", 3), ("eps", 2)):
            if key in cfg:
                if len(cfg[key]) != n:
                    raise ValueError(f"optimizer.{key}: CAME takes {n} values, got {cfg[key]}")
                cfg[key] = tuple(cfg[key])
        if cfg.pop("foreach", True):
            from .came import CAME
        else:
            from came_pytorch import CAME

            if cfg.pop("max_bucket_numel", None) is not None:
                raise ValueError("optimizer.max_bucket_numel: only for the multi-tensor CAME (foreach=True)")
        return CAME(params, **cfg)
    raise ValueError(f"optimizer.type {kind!r}: expected one of {', '.join(OPTIMIZERS)}")


def _check_keys(cfg: Mapping, allowed: set[str], kind: str) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(
            f"optimizer: unknown key(s) {', '.join(unknown)} for {kind} (known: {sorted(allowed)})"
        )
    if "lr" not in cfg:
        raise ValueError(f"optimizer: {kind} needs lr")


def lr_factor(
    step: int, schedule: str, warmup_steps: int, total_steps: int | None, min_lr_ratio: float
) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping, total_steps: int | None) -> LambdaLR:
    """LambdaLR stepped once per optimizer step; `total_steps` is needed for cosine (None = unknown)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "constant")
    warmup = int(cfg.pop("warmup_steps", 0))
    min_ratio = float(cfg.pop("min_lr_ratio", 0.0))
    if cfg:
        raise ValueError(
            f"lr_schedule: unknown key(s) {', '.join(sorted(cfg))} (known: type, warmup_steps, min_lr_ratio)"
        )
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule.type {kind!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if kind == "cosine" and not total_steps:
        raise ValueError("lr_schedule: cosine needs a known number of steps (set max_steps or num_epochs)")
    if warmup < 0:
        raise ValueError(f"lr_schedule.warmup_steps must be >= 0, got {warmup}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, kind, warmup, total_steps, min_ratio))


def rescale_lr(
    optimizer: torch.optim.Optimizer, lr_scheduler: LambdaLR, old_lr: float, new_lr: float
) -> None:
    """A resumed run's new `optimizer.lr`: every group's base LR scaled by new/old (groups keep their ratios),
    and the current LR recomputed from the schedule at its step, as if the run had used it from the start."""
    ratio = new_lr / old_lr
    lr_scheduler.base_lrs = [base * ratio for base in lr_scheduler.base_lrs]
    for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
