"""Train the flow MLP that maps H&E UNI2-h tokens to IHC tokens (rectified flow per token), under accelerate.

    accelerate launch -m virtual_staining.train_flow_mlp configs/virtual_staining/flow_mlp_mist.py \\
        --data-root /data/MIST --stain HER2 --work-dir work_dirs/flow_mist_her2 \\
        --cfg-options uni=/weights/uni2h/pytorch_model.bin

First the UNI2-h tokens of every H&E and IHC image of the split are computed once and cached
(`<work_dir>/embeddings/`, or `data.embeddings_dir` to share them with the LoRA trainer); training then runs on
the cached token pairs. To resume, run the same command again (latest complete checkpoint in the work dir).
SIGTERM / SIGUSR1 and --time-limit save and stop. The weights for staining are written to
`<work_dir>/flow_mlp.safetensors` at every checkpoint (EMA weights when `ema_rate` is set).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from diffusion.training.checkpoint import CheckpointManager, restore_training_state, save_training_state
from diffusion.training.ema import EMA
from diffusion.training.optim import build_lr_scheduler, build_optimizer
from diffusion.training.run import TrainLoop, resume_checkpoint, run_trainer, seeded_generator, setup_logging
from diffusion.training.sampler import BatchStream, ResumableSampler
from diffusion.training.signals import parse_duration
from diffusion.training.tracking import environment, save_run_info
from virtual_staining.flow_mlp import FlowMLP, flow_matching_loss, save_flow_mlp, translation_metrics
from virtual_staining.training import load_run_config, parse_args, split_embeddings

log = logging.getLogger("pixcell.train")


class TokenPairs(Dataset):
    """(he (T, C), ihc (T, C)) float32 token pairs of one image each."""

    def __init__(self, he: torch.Tensor, ihc: torch.Tensor):
        self.he, self.ihc = he, ihc

    def __len__(self) -> int:
        return len(self.he)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.he[i].float(), self.ihc[i].float()


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args, "flow_mlp")
    work_dir = Path(args.work_dir)
    accelerator = Accelerator()
    is_main, device = accelerator.is_main_process, accelerator.device
    setup_logging(accelerator, work_dir)
    resume = resume_checkpoint(work_dir, args.resume_from)

    # ---- data: cached UNI token pairs
    _, train = split_embeddings(cfg, accelerator, work_dir, cfg.data.train_split)
    val = None
    if cfg.data.val_split and cfg.validation.every_steps > 0:
        _, val = split_embeddings(cfg, accelerator, work_dir, cfg.data.val_split)
    if train.he.shape[-1] != cfg.flow.in_channels:
        raise ValueError(
            f"config flow.in_channels={cfg.flow.in_channels}, but the UNI tokens of {cfg.dataset} are "
            f"{train.he.shape[-1]}-d (encoder {cfg.uni})"
        )
    dataset = TokenPairs(train.he, train.ihc)
    sampler = ResumableSampler(
        len(dataset),
        cfg.train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        seed=cfg.seed,
    )
    loader = DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=sampler, drop_last=True)
    total_steps = cfg.max_steps or cfg.num_epochs * sampler.batches_per_epoch

    # ---- model and optimisation (same seed everywhere: identical initialisation on every process)
    torch.manual_seed(cfg.seed)
    model = FlowMLP(**cfg.flow)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_schedule, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA(unwrapped, cfg.ema_rate) if cfg.ema_rate else None
    gen = seeded_generator(device, cfg.seed, accelerator.process_index)
    manager = CheckpointManager(work_dir, accelerator, keep_last=cfg.keep_last)

    state = dict(step=0, epoch=0, batch_in_epoch=0)
    if resume is not None:
        restore_training_state(manager, resume, state, lr_scheduler, {"generator": gen}, ema=ema)
        log.info("resumed from %s at step %d", resume, state["step"])
    if is_main:
        env = environment(accelerator)
        env.update(total_steps=total_steps, train_pairs=len(dataset), resumed_from=str(resume or ""))
        save_run_info(work_dir, cfg.pretty_text, env)

    def export() -> None:
        if is_main:
            if ema is not None:
                with ema.swapped(unwrapped):
                    save_flow_mlp(unwrapped, work_dir / "flow_mlp.safetensors")
            else:
                save_flow_mlp(unwrapped, work_dir / "flow_mlp.safetensors")

    def save(step: int) -> None:
        save_training_state(manager, step, state, lr_scheduler, cfg.pretty_text, {"generator": gen}, ema=ema)
        export()

    batch_stream = BatchStream(loader, sampler, state)
    log.info("training %d steps on %d pairs (%d tokens each), %d process(es) x batch %d",
             total_steps, len(dataset), train.he.shape[1], accelerator.num_processes, cfg.train_batch_size)  # fmt: skip
    with TrainLoop(accelerator, work_dir, cfg, save, total_steps, state["step"], resumed=resume is not None,
                   time_limit=parse_duration(args.time_limit), desc="flow MLP") as loop:  # fmt: skip
        while state["step"] < total_steps:
            reason = loop.stop_reason()
            if reason:
                loop.save_and_stop(reason, state["step"])
                break
            he, ihc = next(batch_stream)

            loss = flow_matching_loss(model, he.to(device), ihc.to(device), generator=gen)
            accelerator.backward(loss)
            clip = cfg.gradient_clip or math.inf
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            if ema is not None:
                ema.update(unwrapped)
            state["step"] += 1
            step = state["step"]
            loop.log_step(step, loss, optimizer.param_groups[0]["lr"], grad_norm)
            if (
                val is not None
                and (step % cfg.validation.every_steps == 0 or step == total_steps)
                and is_main
            ):
                with ema.swapped(unwrapped) if ema is not None else contextlib.nullcontext():
                    metrics = translation_metrics(
                        unwrapped.eval(), val.he, val.ihc, cfg.validation.flow_steps
                    )
                unwrapped.train()
                loop.tracker.log_scalars({f"val/{k}": v for k, v in metrics.items()}, step)
                log.info(
                    "step %d validation: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                )
            loop.save_if_due(step)
    accelerator.end_training()
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_trainer(main, parse_args(argv, __doc__))


if __name__ == "__main__":
    sys.exit(cli())
