"""The optimizer step every trainer takes: clip the global gradient norm, skip non-finite steps, stop after too
many in a row (naming the last good checkpoint, which stays intact)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from ..checkpoints import latest_checkpoint

log = logging.getLogger("pixcell.train")


def clipped_step(accelerator, params: Iterable[torch.nn.Parameter], optimizer, clip: float | None) -> tuple[float, bool]:
    """Clip the (synchronised) global grad norm to `clip` (None/0: no clipping), step unless the loss or gradient
    is non-finite, zero the gradients. -> (grad norm before clipping, skipped)."""
    grad_norm = accelerator.clip_grad_norm_(params, clip or math.inf)
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    if accelerator.scaler is not None:  # fp16: the grad scaler skips inf/NaN steps itself (and lowers its scale)
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
        log.warning("step %d: non-finite loss or gradient: step skipped [%d in a row, %d in total]", step,
                    self.in_a_row, state["nonfinite_total"])  # fmt: skip
        if self.in_a_row >= self.limit:
            last = latest_checkpoint(self.work_dir)
            raise RuntimeError(
                f"{self.in_a_row} consecutive steps with a non-finite loss or gradient (up to step {step}): "
                f"stopping. The last good checkpoint is {last or 'none (nothing saved yet)'}; lower "
                "optimizer.lr, use bf16 instead of fp16, or check the data, then resume"
            )
