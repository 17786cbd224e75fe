"""What every trainer does around its own model and loss: the run's command-line flags, logging to the console and
`<work_dir>/train.log`, the checkpoint to resume from, the per-process noise generator, the error-line entry
point, and `TrainLoop`, the bookkeeping after each optimizer step (progress bar, tracker, log line, checkpoint on
an interval, at the end, and on a stop signal or the time limit).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_path
from ..checkpoints import latest_checkpoint
from .signals import StopRequest
from .tracking import REPORT_TO, RunTracker, Throughput, progress_bar

log = logging.getLogger("pixcell.train")


def add_resume_args(parser: argparse.ArgumentParser) -> None:
    """--resume-from, --time-limit, --report-to: the flags every trainer takes after its own."""
    parser.add_argument(
        "--resume-from", default=None, help="checkpoint to resume from (default: latest in work dir)"
    )
    parser.add_argument(
        "--time-limit", default=None, help="save and stop after this wall time (e.g. 3:55:00, 4h)"
    )
    parser.add_argument("--report-to", choices=list(REPORT_TO), default=None)


def check_world_size(accelerator) -> None:
    """Every process the launcher started must be in accelerate's process group. Otherwise (e.g. `accelerate
    launch --use_fsdp` on a machine without GPUs, where accelerate falls back to one process each) N independent
    copies would train and write the same work dir."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}): they would train as independent copies. FSDP and DeepSpeed need "
            "GPUs; on CPU launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N"
        )


def setup_logging(accelerator, work_dir: Path) -> None:
    """INFO on the main process (console + <work_dir>/train.log), warnings only elsewhere; then a barrier, so
    the work dir exists for every process. `run_trainer` closes the log file. Checks the world size first."""
    check_world_size(accelerator)
    is_main = accelerator.is_main_process
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format=f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(message)s",
        force=True,
    )
    if is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(work_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
    accelerator.wait_for_everyone()


def resume_checkpoint(work_dir: Path, resume_from: str | None) -> Path | None:
    """The checkpoint to continue from: the latest complete one in `work_dir` ("run the same command again"), or
    `--resume-from` (a checkpoint, or another work dir's latest); None starts a fresh run."""
    resume = latest_checkpoint(resume_from or work_dir)
    if resume_from and resume is None:
        raise FileNotFoundError(
            f"--resume-from {resume_from}: not a complete checkpoint or a work dir with one"
        )
    return resume


def seeded_generator(device: torch.device, seed: int, rank: int) -> torch.Generator:
    """The trainer's noise generator: different per process, saved per rank in every checkpoint."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + rank)


def run_trainer(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """A trainer's entry point: bad input -> one `error:` line and exit status 2 (no traceback); the run's log file
    is closed either way (trainers are also run in-process, by tests, and must not log into each other's files)."""
    t0 = time.monotonic()
    try:
        code = main(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
    log.info("wall time %.1f s", time.monotonic() - t0)
    return code


class TrainLoop:
    """The bookkeeping after each optimizer step, the same in every trainer.

    Every step advances the progress bar; every `cfg.log_every_steps` steps and at the last one, the loss (mean
    over processes), LR and grad norm go to the bar, the tracker (`cfg.report_to`) and one `step i/n ...` log
    line; every `cfg.save_every_steps` steps and at the last one, `save(step)` writes a checkpoint. When
    `stop_reason()` (a signal or the time limit, agreed over processes) says so, the trainer calls `save_and_stop`
    and leaves its loop. Use it as a context manager: the bar and tracker close and the signal handlers are
    restored, also on errors.
    """

    def __init__(
        self,
        accelerator,
        work_dir: Path,
        cfg,  # reads report_to, log_every_steps, save_every_steps (and logs to_dict() to the tracker)
        save: Callable[[int], object],  # writes checkpoint `step`; every process calls it
        total_steps: int,
        start_step: int,  # the resumed step, 0 for a fresh run
        resumed: bool,  # start_step is a saved checkpoint already
        time_limit: float | None = None,  # seconds
        desc: str = "train",  # progress bar label
    ):
        is_main = accelerator.is_main_process
        self.accelerator = accelerator
        self.work_dir = work_dir
        self.save = save
        self.total_steps = total_steps
        self.log_every, self.save_every = cfg.log_every_steps, cfg.save_every_steps
        self.tracker = RunTracker(work_dir, cfg.report_to, enabled=is_main, config=cfg.to_dict())
        self.stop = StopRequest(time_limit=time_limit)
        self.bar = progress_bar(total_steps, initial=start_step, enabled=is_main, desc=desc)
        self.speed = Throughput()
        self.last_saved = start_step if resumed else -1

    def __enter__(self) -> TrainLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.tracker.close()
        self.stop.restore()

    def stop_reason(self) -> str | None:
        """Why to stop before the next step (a signal or the time limit on any process), else None. Collective."""
        return self.stop.should_stop(self.accelerator)

    def save_and_stop(self, reason: str, step: int) -> None:
        """The checkpoint of a run that stops early at `step` (none if that step is saved already)."""
        log.warning("%s: saving a checkpoint at step %d and stopping", reason, step)
        if self.last_saved != step:
            self.save(step)
            self.last_saved = step

    def log_step(
        self,
        step: int,
        loss: torch.Tensor,  # this process's loss of the step
        lr: float,
        grad_norm: float,
        images: int | None = None,  # images of the step over all processes: img/s is tracked when given
        scalars: Mapping[str, float] | None = None,  # the trainer's own, tracked after the common ones
        show_rate: bool = True,  # img/s also in the bar and the log line
    ) -> None:
        """After step `step`: advance the bar; every `log_every_steps` steps and at the last, report."""
        self.bar.update(1)
        if images is not None:
            self.speed.add(images)
        if step % self.log_every != 0 and step != self.total_steps:
            return
        mean_loss = self.accelerator.reduce(loss.detach().reshape(1), reduction="mean").item()  # collective
        values = {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": grad_norm}
        postfix = {"loss": f"{mean_loss:.4f}", "lr": f"{lr:.2e}"}
        line = "step %d/%d loss %.5f lr %.3g grad_norm %.4g"
        args = [step, self.total_steps, mean_loss, lr, grad_norm]
        if images is not None:
            rate = self.speed.rate()
            values["train/images_per_s"] = rate
            if show_rate:
                postfix["img_s"] = f"{rate:.1f}"
                line, args = line + " img/s %.1f", [*args, rate]
        self.bar.set_postfix(**postfix)
        self.tracker.log_scalars({**values, **(scalars or {})}, step)
        log.info(line, *args)

    def save_grid(self, name: str, grid: np.ndarray, step: int) -> None:
        """A validation grid (uint8 (H, W, 3)): `<work_dir>/validation/step_<step>.png` and tracker image `name`."""
        with atomic_path(self.work_dir / "validation" / f"step_{step:07d}.png") as tmp:
            Image.fromarray(grid).save(tmp, format="PNG")
        self.tracker.log_image(name, grid, step)

    def save_if_due(self, step: int) -> None:
        """The checkpoint of every `save_every_steps` steps and of the last step."""
        if step % self.save_every == 0 or step == self.total_steps:
            self.save(step)
            self.last_saved = step
