"""The optimizer step every trainer takes: the noised inputs of a diffusion batch, forward/backward over the
micro-batches of one step, clip the global gradient norm, skip non-finite steps, stop after too many in a row
(naming the last good checkpoint, which stays intact)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..checkpoints import latest_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..gaussian_diffusion import GaussianDiffusion

log = logging.getLogger("pixcell.train")


def noised_inputs(
    diffusion: GaussianDiffusion,
    x0: Tensor,  # (B, C, h, w) model-space latents
    uni: Tensor,  # (B, T, C_uni) conditions
    generator: torch.Generator,  # the trainer's noise generator (checkpointed)
    drop_prob: float,  # classifier-free guidance: p of the null condition
    drop_condition: Callable[[Tensor, Tensor], Tensor],  # the model's own (same path as a real condition)
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The inputs of one diffusion training batch: -> (x_t, t, noise, uni with null rows).

    Timesteps uniform, Gaussian noise, and the null condition swapped in for each row with p = drop_prob (no draw
    when 0). The draws come from `generator` in this order (t, noise, drop), which exact resume relies on."""
    b, device = x0.shape[0], x0.device
    t = diffusion.sample_timesteps(b, device, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    if drop_prob > 0:
        uni = drop_condition(uni, torch.rand(b, generator=generator, device=device) < drop_prob)
    return diffusion.q_sample(x0, t, noise), t, noise, uni


def accumulate(
    accelerator: Accelerator,
    model: torch.nn.Module,  # the prepared (DDP) model whose gradients are synchronised
    batches: Sequence,  # the micro-batches of one optimizer step
    loss_of: Callable[[object], tuple[Tensor, int] | None],  # batch -> (loss, images), or None to skip it
) -> tuple[Tensor | None, int]:
    """Forward and backward over the micro-batches of one optimizer step, gradients synchronised on the last one
    only (`no_sync` before). -> (mean loss, images), (None, 0) when every micro-batch was skipped."""
    losses, images = [], 0
    for micro, batch in enumerate(batches):
        with contextlib.nullcontext() if micro == len(batches) - 1 else accelerator.no_sync(model):
            result = loss_of(batch)
            if result is None:
                continue
            loss, n = result
            accelerator.backward(loss / len(batches))
        losses.append(loss.detach())
        images += n
    return (torch.stack(losses).mean(), images) if losses else (None, 0)


def clipped_step(
    accelerator: Accelerator,
    params: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,  # fp16: the accelerate-prepared one (it reports step_was_skipped)
    clip: float | None,
) -> tuple[float, bool]:
    """Clip the (synchronised) global grad norm to `clip` (None/0: no clipping), step unless the loss or gradient
    is non-finite, zero the gradients. -> (grad norm before clipping, skipped)."""
    grad_norm = accelerator.clip_grad_norm_(params, clip or math.inf)
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    if (
        accelerator.scaler is not None
    ):  # fp16: the grad scaler skips inf/NaN steps itself (and lowers its scale)
        optimizer.step()
        skipped = bool(optimizer.step_was_skipped)
    else:
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


class NonFiniteGuard:
    """Counts skipped steps in a row; `limit` of them stop the run with one clear error."""

    def __init__(self, limit: int, work_dir: str | Path):
        self.limit = limit
        self.work_dir = Path(work_dir)
        self.in_a_row = 0

    def update(self, skipped: bool, state: dict) -> None:
        """After a step: counts a skipped one in `state["nonfinite_total"]` (the trainer's checkpointed counter)
        and in the run of consecutive ones; `state["step"]` is the step just taken."""
        if not skipped:
            self.in_a_row = 0
            return
        state["nonfinite_total"] += 1
        self.in_a_row += 1
        step = state["step"]
        log.warning(
            "step %d: non-finite loss or gradient: step skipped [%d in a row, %d in total]",
            step,
            self.in_a_row,
            state["nonfinite_total"],
        )
        if self.in_a_row >= self.limit:
            last = latest_checkpoint(self.work_dir)
            raise RuntimeError(
                f"{self.in_a_row} consecutive steps with a non-finite loss or gradient (up to step {step}): "
                f"stopping. The last good checkpoint is {last or 'none (nothing saved yet)'}; lower "
                "optimizer.lr, use bf16 instead of fp16, or check the data, then resume"
            )
