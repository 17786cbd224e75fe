"""Train the flow MLP that maps H&E UNI2-h tokens to IHC tokens (rectified flow per token), under accelerate.

    accelerate launch train_scripts/train_flow_mlp.py configs/virtual_staining/flow_mlp_mist.py \\
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
import logging
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from diffusion.command import run_cli
from diffusion.config import parse_cfg_options
from diffusion.data.ihc_tokens import TokenSplit, load_staining_config, split_embeddings
from diffusion.model.flow_mlp import FlowMLP, flow_matching_loss, save_flow_mlp, translation_metrics
from diffusion.training.run import RunSettings, add_resume_args, launch, run_trainer, start_run
from diffusion.training.sampler import BatchStream, ResumableSampler

log = logging.getLogger("pixcell.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file, e.g. configs/virtual_staining/flow_mlp_mist.py")
    p.add_argument("--work-dir", required=True, help="run folder: checkpoints, logs, exported weights")
    p.add_argument("--data-root", default=None, help="dataset root (MIST or HER2Match folder)")
    p.add_argument("--stain", default=None, help="MIST: HER2, ER, PR, Ki67 (HER2Match: HER2)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    add_resume_args(p)
    return p.parse_args(argv)


def staining_options(args: argparse.Namespace) -> dict:
    """--cfg-options with --data-root, --stain and --report-to folded in."""
    options = parse_cfg_options(args.cfg_options)
    for key, value in (("data.root", args.data_root), ("stain", args.stain), ("report_to", args.report_to)):
        if value is not None:
            options[key] = value
    return options


class TokenPairs(Dataset):
    """(he (T, C), ihc (T, C)) float32 token pairs of one image each."""

    def __init__(self, he: torch.Tensor, ihc: torch.Tensor):
        self.he, self.ihc = he, ihc

    def __len__(self) -> int:
        return len(self.he)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.he[i].float(), self.ihc[i].float()


def main(args: argparse.Namespace) -> int:
    cfg = load_staining_config(args.config, staining_options(args), "flow_mlp")
    work_dir = Path(args.work_dir)
    accelerator, resume = launch(work_dir, args.resume_from)
    is_main, device = accelerator.is_main_process, accelerator.device

    # ---- data: cached UNI token pairs
    _, train = split_embeddings(TokenSplit.from_config(cfg, work_dir, cfg.data.train_split), accelerator)
    val = None
    if cfg.data.val_split and cfg.validation.every_steps > 0:
        _, val = split_embeddings(TokenSplit.from_config(cfg, work_dir, cfg.data.val_split), accelerator)
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
    run = start_run(
        accelerator,
        RunSettings.from_config(cfg),
        work_dir,
        FlowMLP(**cfg.flow),
        total_steps,
        resume,
        generator_name="generator",
        info=dict(train_pairs=len(dataset)),
    )
    model, unwrapped, state, gen = run.model, run.unwrapped, run.state, run.generator

    def save(step: int) -> None:
        run.save(step)
        if is_main:
            with run.ema_weights():
                save_flow_mlp(unwrapped, work_dir / "flow_mlp.safetensors")

    batch_stream = BatchStream(loader, sampler, state)
    log.info(
        "training %d steps on %d pairs (%d tokens each), %d process(es) x batch %d",
        total_steps,
        len(dataset),
        train.he.shape[1],
        accelerator.num_processes,
        cfg.train_batch_size,
    )
    with run.loop(save, args.time_limit, desc="flow MLP") as loop:
        while state["step"] < total_steps and not loop.should_stop(state["step"]):
            he, ihc = next(batch_stream)

            loss = flow_matching_loss(model, he.to(device), ihc.to(device), generator=gen)
            accelerator.backward(loss)
            grad_norm, step = run.optimizer_step(cfg.gradient_clip)
            loop.log_step(step, loss, run.lr, grad_norm)
            if (
                val is not None
                and (step % cfg.validation.every_steps == 0 or step == total_steps)
                and is_main
            ):
                with run.ema_weights():
                    metrics = translation_metrics(
                        unwrapped.eval(), val.he, val.ihc, cfg.validation.flow_steps
                    )
                unwrapped.train()
                loop.tracker.log_scalars({f"val/{k}": v for k, v in metrics.items()}, step)
                log.info(
                    "step %d validation: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                )
            loop.save_if_due(step)
    return run.finish()


def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input is one `error:` line and exit status 2, as for every tool."""
    return run_cli(lambda a: run_trainer(main, parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(cli())
