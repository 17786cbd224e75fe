"""The trainer skeleton, written once: what every trainer does around its own model, data and loss.

`launch` starts accelerate, logging (console + `<work_dir>/train.log`) and finds the checkpoint to resume from;
`start_run` builds the optimizer and LR schedule, prepares the model, makes the EMA, the per-process noise
generator, the checkpoint manager and the checkpointed counters, restores them all when resuming, and writes the
run info; it returns a `Run`. `Run.loop` gives the `TrainLoop`, which owns the bookkeeping after each optimizer
step (progress bar, tracker, log line, checkpoint on an interval and at the end) and the one stop protocol (a
signal or the time limit, agreed over processes, checked at the top of each step: save and leave). `run_trainer`
releases the lock and restores logging after a run; `diffusion.command.run_cli` around it is the error-line entry point
of every trainer, as of every tool. A minimal trainer (the four real ones, `train_scripts/train_pixcell.py`,
`train_scripts/train_controlnet.py`, `train_scripts/train_lora.py`, `train_scripts/train_flow_mlp.py`, add
validation, gradient accumulation and portable weights to the same lines):

    def main(args):
        cfg = load_strict_config(args.config, SCHEMA, parse_cfg_options(args.cfg_options))
        work_dir = Path(args.work_dir)
        accelerator, resume = launch(work_dir, args.resume_from, cfg.mixed_precision)
        torch.manual_seed(cfg.seed)  # identical initialisation on every process
        data = MyDataset(cfg.data)
        sampler = ResumableSampler(len(data), cfg.train_batch_size, accelerator.num_processes,
                                   accelerator.process_index, seed=cfg.seed)
        run = start_run(accelerator, RunSettings.from_config(cfg), work_dir, MyModel(**cfg.model), cfg.max_steps,
                        resume)
        loader = DataLoader(data, cfg.train_batch_size, sampler=sampler, drop_last=True)
        batches = BatchStream(loader, sampler, run.state)  # the data position is checkpointed in run.state
        with run.loop(run.save, args.time_limit) as loop:
            while run.state["step"] < run.total_steps and not loop.should_stop(run.state["step"]):
                loss = my_loss(run.model, next(batches), generator=run.generator)
                accelerator.backward(loss)
                grad_norm, step = run.optimizer_step(cfg.gradient_clip)  # clip, step, LR schedule, EMA
                loop.log_step(step, loss, run.lr, grad_norm)
                loop.save_if_due(step)
        return run.finish()

The config needs: seed, optimizer, lr_schedule, ema_rate (None: no EMA), keep_last, report_to, log_every_steps,
save_every_steps. To resume, run the same command again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from mmengine.config import Config
from PIL import Image
from torch.optim.lr_scheduler import LRScheduler

from ..atomic import atomic_path
from ..checkpoints import latest_checkpoint
from ..config import check_resume_changes
from ..lock import FolderLock, release_held
from .checkpoint import CheckpointManager, restore_training_state, save_training_state, saved_config
from .ema import EMA
from .fsdp import FSDPSettings, ShardedTrainingState, is_distributed, local, shard_model
from .optim import build_lr_scheduler, build_optimizer, rescale_lr
from .signals import StopRequest, parse_duration
from .step import NonFiniteGuard, clipped_step
from .tracking import REPORT_TO, RunTracker, Throughput, environment, progress_bar, save_run_info

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


def check_world_size(accelerator: Accelerator) -> None:
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


class _LogFile(logging.FileHandler):
    """train.log; on a write error (a full disk) it says so once and drops out, instead of logging's traceback
    for every record. The console keeps logging, and the error that follows names the file and the cause."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        print(
            f"warning: cannot write {self.baseFilename} ({err}); logging to the console only", file=sys.stderr
        )
        logging.getLogger().removeHandler(self)


def setup_logging(accelerator: Accelerator, work_dir: Path) -> None:
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
        handler = _LogFile(work_dir / "train.log")
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


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether `accelerate launch` asked for a sharded run (FSDP or DeepSpeed) rather than DDP or one process."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def launch(work_dir: Path, resume_from: str | None, mixed_precision: str = "no", ddp_only: str | None = None):
    """The first lines of every trainer: accelerate (DDP / FSDP / DeepSpeed and the process group come from
    `accelerate launch`), logging, and the checkpoint to continue from (None: a fresh run).
    ddp_only: the one-line error of a trainer that cannot run sharded, raised for an FSDP / DeepSpeed launch.
    -> (accelerator, resume)."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed_precision)
    if ddp_only and is_sharded(accelerator):
        raise ValueError(ddp_only)
    if accelerator.is_main_process:  # one run per work dir: the job's main process holds the lock for all
        FolderLock(work_dir, what="work dir").acquire()  # released by run_trainer, or when the process dies
    setup_logging(accelerator, work_dir)
    return accelerator, resume_checkpoint(work_dir, resume_from)


def run_trainer(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """A trainer's run, inside the tools' one entry point (`diffusion.command.run_cli`, which turns bad input into one
    `error:` line and exit status 2). Afterwards, however it ended, the work dir's lock is released and the logging
    set-up is as it was before (the run's log file closed): trainers are also run in-process, by tests, and must
    not log into each other's files or into a closed stream."""
    t0 = time.monotonic()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    try:
        code = main(args)
        log.info("wall time %.1f s", time.monotonic() - t0)
        return code
    finally:
        release_held()
        for handler in [h for h in root.handlers if h not in before[0]]:
            root.removeHandler(handler)
            handler.close()
        root.handlers[:] = before[0]
        root.setLevel(before[1])


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True if `flag` is true on any process (collective; every process calls it)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


@dataclass(frozen=True)
class RunSettings:
    """What the run machinery (start_run, Run, TrainLoop) reads of a trainer's config: built once at the entry
    point by `RunSettings.from_config(cfg)`; the library never sees the config object."""

    seed: int
    optimizer: Mapping[str, object]  # diffusion.training.optim.build_optimizer's settings
    lr_schedule: Mapping[str, object]
    ema_rate: float | None  # None / 0: no EMA
    keep_last: int | None  # checkpoints kept
    train_batch_size: int | None  # per process (what a skipped micro-batch counts in skipped_samples)
    report_to: str  # tensorboard (default), wandb, none
    log_every_steps: int
    save_every_steps: int
    max_nonfinite_steps: int | None  # skipped steps in a row before the run stops (None: no limit)
    config_text: str  # the resolved config as Python: saved beside the run and in every checkpoint
    config: Mapping[str, object]  # the same as a dict: the tracker's hyperparameters, the resume comparison

    @classmethod
    def from_config(cls, cfg: Config) -> RunSettings:
        return cls(
            seed=cfg.seed,
            optimizer=dict(cfg.optimizer),
            lr_schedule=dict(cfg.lr_schedule),
            ema_rate=cfg.ema_rate,
            keep_last=cfg.keep_last,
            train_batch_size=cfg.get("train_batch_size"),
            report_to=cfg.report_to,
            log_every_steps=cfg.log_every_steps,
            save_every_steps=cfg.save_every_steps,
            max_nonfinite_steps=cfg.get("max_nonfinite_steps"),
            config_text=cfg.pretty_text,
            config=cfg.to_dict(),
        )


class TrainLoop:
    """The bookkeeping after each optimizer step, the same in every trainer.

    Every step advances the progress bar; every `cfg.log_every_steps` steps and at the last one, the loss (mean
    over processes), LR and grad norm go to the bar, the tracker (`cfg.report_to`) and one `step i/n ...` log
    line; every `settings.save_every_steps` steps and at the last one, `save(step)` writes a checkpoint. When
    `stop_reason()` (a signal or the time limit, agreed over processes) says so, the trainer calls `save_and_stop`
    and leaves its loop. Use it as a context manager: the bar and tracker close and the signal handlers are
    restored, also on errors.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        work_dir: Path,
        settings: RunSettings,  # report_to, log_every_steps, save_every_steps, config (logged to the tracker)
        save: Callable[[int], object],  # writes checkpoint `step`; every process calls it
        total_steps: int,
        start_step: int,  # the resumed step, 0 for a fresh run
        resumed: bool,  # start_step is a saved checkpoint already
        time_limit: float | None = None,  # seconds
        desc: str = "train",  # progress bar label
        guard: NonFiniteGuard | None = None,  # while it counts skipped steps in a row, nothing is saved
    ):
        is_main = accelerator.is_main_process
        self.guard = guard
        self.accelerator = accelerator
        self.work_dir = work_dir
        self.save = save
        self.total_steps = total_steps
        self.log_every, self.save_every = settings.log_every_steps, settings.save_every_steps
        self.tracker = RunTracker(work_dir, settings.report_to, enabled=is_main, config=dict(settings.config))
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

    def in_streak(self, step: int) -> bool:
        """True while steps are being skipped for non-finite losses: a checkpoint now could hold exploded weights,
        and saving it would prune a good one, so none is written until a step succeeds again."""
        if self.guard is None or self.guard.in_a_row == 0:
            return False
        log.warning(
            "step %d: not saving a checkpoint during %d non-finite steps in a row (the last one is %s)",
            step,
            self.guard.in_a_row,
            latest_checkpoint(self.work_dir) or "none",
        )
        return True

    def save_and_stop(self, reason: str, step: int) -> None:
        """The checkpoint of a run that stops early at `step` (none if that step is saved already, or during a
        streak of non-finite steps)."""
        log.warning("%s: saving a checkpoint at step %d and stopping", reason, step)
        if self.last_saved != step and not self.in_streak(step):
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
        if (step % self.save_every == 0 or step == self.total_steps) and not self.in_streak(step):
            self.save(step)
            self.last_saved = step

    def should_stop(self, step: int) -> bool:
        """The stop protocol of every trainer, called at the top of each step before its batches are drawn (so the
        data position needs no rewinding): when any process was asked to stop (a signal or the time limit; one
        collective), save checkpoint `step` (unless saved already) and return True: leave the training loop."""
        reason = self.stop_reason()
        if reason is None:
            return False
        self.save_and_stop(reason, step)
        log.info("stopped at step %d of %d; run the same command again to resume", step, self.total_steps)
        return True


@dataclass
class Run:
    """What `start_run` hands a trainer: the prepared model and optimizer, the schedule, EMA, noise generator,
    checkpointed counters and the checkpoint manager of one run."""

    accelerator: Accelerator
    settings: RunSettings
    work_dir: Path
    model: torch.nn.Module  # prepared (the DDP / FSDP wrapper): forward, backward and clipping go through it
    unwrapped: torch.nn.Module  # the trainer's own module: its methods, config and portable weights
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMA | None
    ema_module: torch.nn.Module  # what the EMA tracks: `unwrapped`, or the local shards (`model`) under FSDP
    generator: torch.Generator  # this process's noise generator, saved per rank in every checkpoint
    generator_name: str  # its name in the checkpoint's rank files
    state: dict  # step, epoch, batch_in_epoch + the trainer's own counters: saved in every checkpoint
    manager: CheckpointManager
    resume: Path | None  # the checkpoint this run continued from
    total_steps: int
    guard: NonFiniteGuard | None = (
        None  # skipped (non-finite) steps in a row: stop after too many, never save
    )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def ema_weights(self):
        """Context: the EMA weights swapped into the model (validation, export); the raw weights without EMA."""
        return self.ema.swapped(self.ema_module) if self.ema is not None else contextlib.nullcontext()

    def ema_eval(self, make: Callable[[], np.ndarray]) -> np.ndarray:
        """`make()` (a validation grid) with the model in eval mode and the EMA weights swapped in; then back to
        training mode and the raw weights."""
        self.model.eval()
        with self.ema_weights():
            out = make()
        self.model.train()
        return out

    def save(self, step: int, portable: dict | None = None) -> Path:
        """Checkpoint `step` (every process calls it): accelerate's state, EMA, LR schedule, counters, config and
        noise generator; `portable` as in `CheckpointManager.save`. Weights that are not finite are never saved:
        that is one error line naming the last checkpoint."""
        finite = all(bool(torch.isfinite(local(p)).all()) for p in self.model.parameters())
        if any_process(self.accelerator, not finite):
            raise RuntimeError(
                f"step {step}: the weights hold NaN or Inf, not saving them; the last checkpoint is "
                f"{latest_checkpoint(self.work_dir) or 'none'}; lower optimizer.lr or check the data, then resume"
            )
        return save_training_state(
            self.manager,
            step,
            self.state,
            self.lr_scheduler,
            self.settings.config_text,
            {self.generator_name: self.generator},
            ema=self.ema,
            portable=portable,
        )

    def next_batches(self, stream: Iterator, accum: int) -> list | None:
        """This step's `accum` micro-batches from `stream`, or None when one of them had no loadable sample on any
        process (a collective, so every process skips the step together; the dataset logged why). The lost samples
        count in state["skipped_samples"]."""
        batches = [next(stream) for _ in range(accum)]
        if not any_process(self.accelerator, any(b is None for b in batches)):
            return batches
        self.state["skipped_samples"] += sum(
            self.settings.train_batch_size or 1 for b in batches if b is None
        )
        log.warning(
            "step %d: a batch had no loadable sample on some process; step skipped", self.state["step"]
        )
        return None

    def loop(self, save: Callable[[int], object], time_limit: str | float | None = None, desc: str = "train"):
        """The TrainLoop of this run; `save(step)` writes a checkpoint (`self.save`, or the trainer's, which adds
        portable weights); `time_limit` as `--time-limit` takes it (3:55:00, 4h, seconds)."""
        self.train_loop = TrainLoop(
            self.accelerator,
            self.work_dir,
            self.settings,
            save,
            self.total_steps,
            self.state["step"],
            resumed=self.resume is not None,
            time_limit=parse_duration(time_limit),
            desc=desc,
            guard=self.guard,
        )
        return self.train_loop

    def optimizer_step(
        self,
        clip: float | None,  # max global grad norm; None / 0: no clipping
        params: Iterable[torch.nn.Parameter] | None = None,  # default: the prepared model's parameters
    ) -> tuple[float, int]:
        """After the backward passes of a step: clip, step (skipped when the loss or gradient is non-finite),
        `advance`, and count skipped steps in a row (`guard`). -> (grad norm before clipping, the step taken)."""
        params = self.model.parameters() if params is None else params
        grad_norm, skipped = clipped_step(self.accelerator, params, self.optimizer, clip)
        step = self.advance(skipped)
        if self.guard is not None:
            self.guard.update(skipped, self.state)
        return grad_norm, step

    def advance(self, skipped: bool = False) -> int:
        """After an optimizer step: the step count + 1, and unless the step was skipped (non-finite), the LR
        schedule and the EMA follow. -> the step just taken."""
        self.state["step"] += 1
        if not skipped:
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(self.ema_module)
        return self.state["step"]

    def finish(self) -> int:
        """The last line of a trainer: the log line of a finished run, and accelerate's end. -> exit status 0; after
        Ctrl-C (saved like SIGTERM) a KeyboardInterrupt naming the checkpoint, which `run_cli` turns into one line
        and status 130."""
        if self.state["step"] >= self.total_steps:
            log.info("done: %d steps; checkpoints in %s", self.state["step"], self.manager.root)
        self.accelerator.end_training()
        loop = getattr(self, "train_loop", None)
        if (
            loop is not None and loop.stop.signal_name == "SIGINT"
        ):  # Ctrl-C: saved like SIGTERM, then status 130
            raise KeyboardInterrupt(
                f"stopped at step {self.state['step']}; the latest checkpoint is {latest_checkpoint(self.work_dir)}"
            )
        return 0


def same_global_batch(
    saved_text: str, config: Mapping[str, object], resume: Path, num_processes: int
) -> bool:
    """Whether train_batch_size changed with the process count so that the global batch stays (a run resumed on
    another number of processes or nodes: the sampler then deals out the same global batches)."""
    from .checkpoint import read_meta

    old, new = Config.fromstring(saved_text, ".py").get("train_batch_size"), config.get("train_batch_size")
    if not isinstance(old, int) or not isinstance(new, int):  # a trainer without this key
        return False
    return old * read_meta(resume)["world_size"] == new * num_processes


def resume_changes(
    saved_text: str | None, config: Mapping[str, object], resume: Path, num_processes: int = 1
) -> dict[str, tuple]:
    """A resumed run runs the config it is given, never silently the checkpoint's: the changed keys that may
    change (RESUME_CHANGEABLE, and the per-process batch when the global batch stays), each logged; any other
    change is one error line naming every such key (before anything is restored and before config.py is
    rewritten)."""
    if saved_text is None:  # a checkpoint from before configs were saved in it
        return {}
    also = ("train_batch_size",) if same_global_batch(saved_text, config, resume, num_processes) else ()
    changes = check_resume_changes(saved_text, config, resume, also)
    for key, (old, new) in changes.items():
        log.warning("resume: config %s changed from %r to %r; the run continues with %r", key, old, new, new)
    return changes


def apply_resume_changes(
    changes: dict[str, tuple], optimizer: torch.optim.Optimizer, lr_scheduler: LRScheduler
) -> None:
    """After the restore: a new `optimizer.lr` goes into the optimizer and the LR schedule."""
    if "optimizer.lr" in changes:
        old, new = changes["optimizer.lr"]
        rescale_lr(optimizer, lr_scheduler, old, new)
        log.warning(
            "resume: learning rate now %.3g at step %d",
            optimizer.param_groups[0]["lr"],
            lr_scheduler.last_epoch,
        )


def start_run(
    accelerator: Accelerator,
    settings: RunSettings,
    work_dir: Path,
    model: torch.nn.Module,  # built on every process with the same seed
    total_steps: int,
    resume: Path | None,  # from `launch`
    params: Iterable[torch.nn.Parameter] | None = None,  # what to train (default: model.parameters())
    counters: Mapping[str, int] | None = None,  # the trainer's own checkpointed counters, e.g. images_seen=0
    generator_name: str = "noise_generator",  # the generator's key in the checkpoint's rank files
    sharded_ema: bool = False,  # FSDP / DeepSpeed: the EMA of the local shards
    info: Mapping[str, object] | None = None,  # extra run facts for <work_dir>/environment.json
    fsdp: FSDPSettings | None = None,  # shard with fully_shard instead of accelerate's DDP (fsdp.py)
) -> Run:
    """The part of every trainer between building its model and its loop: optimizer -> LR schedule -> prepare
    -> EMA -> noise generator -> checkpoint manager -> counters -> restore (when `resume`) -> run info."""
    if total_steps < 1:
        raise ValueError(f"config: no steps to train (total_steps {total_steps})")
    if fsdp is not None:  # sharded before the optimizer is built: it steps the shards
        model = shard_model(model, fsdp, accelerator.device)
        sharded_ema = is_distributed()
    optimizer = build_optimizer(model.parameters() if params is None else params, settings.optimizer)
    lr_scheduler = build_lr_scheduler(optimizer, settings.lr_schedule, total_steps)
    if fsdp is None:
        prepared, optimizer = accelerator.prepare(model, optimizer)
    else:
        prepared = model
    unwrapped = accelerator.unwrap_model(prepared)
    # EMA over this process's parameters, never through accelerate: the full copy under DDP, the local shard
    # under FSDP (elementwise, so the shards of the EMA are the EMA of the shards).
    ema_module = prepared if sharded_ema else unwrapped
    ema = EMA(ema_module, settings.ema_rate, sharded=sharded_ema) if settings.ema_rate else None
    generator = seeded_generator(accelerator.device, settings.seed, accelerator.process_index)
    shards = ShardedTrainingState(prepared, optimizer, ema) if fsdp is not None else None
    manager = CheckpointManager(work_dir, accelerator, keep_last=settings.keep_last, shards=shards)
    limit = settings.max_nonfinite_steps  # skipped steps in a row before the run stops (None: no limit)
    guard = NonFiniteGuard(limit, work_dir) if limit else None
    counters = {**({"nonfinite_total": 0} if guard else {}), **(counters or {})}
    state = dict(step=0, epoch=0, batch_in_epoch=0, **counters)
    if resume is not None:
        # The configs are compared before anything is restored: a changed model is one line naming its keys,
        # not a load_state_dict error listing hundreds of parameter names.
        changes = resume_changes(saved_config(resume), settings.config, resume, accelerator.num_processes)
        restore_training_state(manager, resume, state, lr_scheduler, {generator_name: generator}, ema=ema)
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            resume,
            state["step"],
            state["epoch"],
            state["batch_in_epoch"],
        )
        apply_resume_changes(changes, optimizer, lr_scheduler)
    if accelerator.is_main_process:
        env = environment(accelerator)
        env.update(total_steps=total_steps, resumed_from=str(resume or ""), **(info or {}))
        kept = save_run_info(work_dir, settings.config_text, env)
        if kept is not None:
            log.warning(
                "%s was edited by hand since the last run wrote it; a run's settings come from the command (config "
                "file and --cfg-options), so it now records this run's config again; the edited file is kept as %s",
                work_dir / "config.py",
                kept,
            )
    return Run(
        accelerator,
        settings,
        work_dir,
        prepared,
        unwrapped,
        optimizer,
        lr_scheduler,
        ema,
        ema_module,
        generator,
        generator_name,
        state,
        manager,
        resume,
        total_steps,
        guard,
    )
