"""Exponential moving average of a model's trainable parameters, kept in fp32 beside the training copy.

The EMA is a plain list of fp32 tensors, one per trainable parameter of the module it was built from, on that
parameter's device. It is never wrapped by accelerate (the original PixCell trainer prepared its EMA copy through
accelerate, which under DDP/FSDP syncs or shards it like a trained model): updates are local elementwise ops.

- DDP / single process: every process holds the full EMA (identical on all ranks, as the parameters are).
- FSDP: build the EMA from the *wrapped* model's parameters: each rank then averages its own shard (the update is
  elementwise, so sharded EMA == EMA of the full model); `sharded=True` tells the checkpoint code to save one file
  per rank. Full EMA weights come from `swapped(model)` + the full-state-dict gather (accelerator.get_state_dict).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """fp32 EMA: ema <- rate * ema + (1 - rate) * param after every optimizer step (PixArt/DiT: rate 0.9999)."""

    def __init__(self, model: nn.Module, rate: float = 0.9999, sharded: bool = False):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"ema_rate must be in [0, 1], got {rate}")
        self.rate = float(rate)
        self.sharded = sharded
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = self._params(model)
        if any(p.numel() == 0 for p in params):
            # DeepSpeed ZeRO-3 leaves empty placeholders outside forward: there is nothing local to average.
            raise ValueError(
                "EMA: some parameters are empty placeholders (DeepSpeed ZeRO-3?); use ZeRO-1/2 or FSDP instead"
            )
        self.shadow: list[Tensor] = [p.detach().to(torch.float32, copy=True) for p in params]

    def _params(self, model: nn.Module) -> list[Tensor]:
        named = dict(model.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise ValueError(
                f"EMA: model has no parameter(s) {', '.join(missing[:3])} (built from another model?)"
            )
        return [named[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module, rate: float | None = None) -> None:
        """One EMA step towards the current parameters of `model` (call after each optimizer step)."""
        rate = self.rate if rate is None else rate
        params = [p.detach().float() for p in self._params(model)]
        torch._foreach_lerp_(self.shadow, params, 1.0 - rate)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the parameters of `model` with the EMA weights (cast to each parameter's dtype)."""
        for p, e in zip(self._params(model), self.shadow):
            p.copy_(e.to(p.dtype))

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into `model` (validation, export); the training weights come back."""
        params = self._params(model)
        backup = [p.detach().clone() for p in params]
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        """{'rate', 'names', 'shadow': list of fp32 CPU tensors} (this rank's shard when sharded)."""
        return {
            "rate": self.rate,
            "names": list(self.names),
            "shadow": [t.detach().cpu() for t in self.shadow],
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("EMA state does not match the model (different parameter names)")
        for dst, src in zip(self.shadow, state["shadow"]):
            if dst.shape != src.shape:
                raise ValueError(f"EMA state shape {tuple(src.shape)} does not match {tuple(dst.shape)}")
            dst.copy_(src)
        self.rate = float(state["rate"])
