"""Train the UNI prior (a rectified flow from noise to stored UNI2-h tokens) under accelerate.

    # PixCell-256 prior, one token per 256 px crop, labelled by cancer type (from the patch paths)
    accelerate launch train_scripts/train_prior.py configs/prior/prior_256.py --work-dir work_dirs/prior256 \\
        --data-root /data/patches --label-from cancer
    # PixCell-1024 prior (16-token grids), packed features, labels from a CSV (patch,label)
    accelerate launch train_scripts/train_prior.py configs/prior/prior_1024.py --work-dir work_dirs/prior1024 \\
        --data-root /data/patches --label-from labels.csv --cfg-options data.feature_format=packed

Reads only the UNI features (`<patch>_uni.npy` or the packed shards' `uni`), never the latents. To resume, run the
same command again (latest complete checkpoint in the work dir); SIGTERM / SIGUSR1 and --time-limit save and
stop. The prior for sampling is written to `<work_dir>/prior/` at every checkpoint (EMA weights when `ema_rate`
is set): `python -m tools.sample --prior <work_dir> ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffusion.atomic import atomic_path
from diffusion.command import run_cli
from diffusion.config import load_strict_config, parse_cfg_options, shipped_config
from diffusion.data.datasets import collate_skip_none
from diffusion.flow import flow_matching_loss
from diffusion.geometry import UNI_TILE
from diffusion.prior.data import LABEL_SOURCES, NO_LABEL, UNITokenDataset, describe_labels, token_stats
from diffusion.prior.model import UNIPrior
from diffusion.training.run import RunSettings, add_resume_args, launch, run_trainer, start_run
from diffusion.training.sampler import BatchStream, ResumableSampler

log = logging.getLogger("pixcell.train")
SCHEMA = shipped_config("prior/_base_/prior.py")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file, e.g. configs/prior/prior_256.py")
    p.add_argument("--work-dir", required=True, help="run folder: checkpoints, logs, the exported prior/")
    p.add_argument("--data-root", default=None, help="patches root (holds metadata/patch_names_all.hdf5)")
    p.add_argument(
        "--label-from",
        default=None,
        help="labels: dataset or cancer (from the patch paths), or a CSV patch,label",
    )
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    add_resume_args(p)
    return p.parse_args(argv)


def load_run_config(args: argparse.Namespace):
    options = parse_cfg_options(args.cfg_options)
    for key, value in (
        ("data.root", args.data_root),
        ("label_from", args.label_from),
        ("report_to", args.report_to),
    ):
        if value is not None:
            options[key] = value
    cfg = load_strict_config(args.config, SCHEMA, options)
    if not cfg.data.root:
        raise ValueError("data root not set: pass --data-root (the patches folder with metadata/)")
    if cfg.resolution % UNI_TILE or not UNI_TILE <= cfg.resolution <= cfg.data.parent_size:
        raise ValueError(
            f"resolution {cfg.resolution}: expected a multiple of {UNI_TILE} up to data.parent_size "
            f"{cfg.data.parent_size}"
        )
    lf = cfg.label_from
    if lf is not None and lf not in LABEL_SOURCES and not str(lf).endswith(".csv"):
        raise ValueError(
            f"--label-from {lf}: expected {' or '.join(LABEL_SOURCES)}, or a .csv file (patch,label)"
        )
    if not 0 <= cfg.label_dropout < 1:
        raise ValueError(f"label_dropout {cfg.label_dropout}: expected a fraction in [0, 1)")
    return cfg


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args)
    work_dir = Path(args.work_dir)
    accelerator, resume = launch(work_dir, args.resume_from)
    is_main, device = accelerator.is_main_process, accelerator.device

    # ---- data: UNI tokens of every crop, with labels
    d = cfg.data
    dataset = UNITokenDataset(
        d.root,
        index_file=d.index_file,
        dataset_keys=d.index_keys,
        resolution=cfg.resolution,
        parent_size=d.parent_size,
        feature_format=d.feature_format,
        features_root=d.features_root,
        seed=cfg.seed,
        max_failure_rate=d.max_failure_rate,
        label_from=cfg.label_from,
        in_memory=d.in_memory,
    )
    mean, std = token_stats(dataset, cfg.stats_samples, cfg.seed)  # the same on every process
    sampler = ResumableSampler(
        len(dataset),
        cfg.train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        seed=cfg.seed,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.train_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=d.num_workers,
        collate_fn=collate_skip_none,
    )
    total_steps = cfg.max_steps or cfg.num_epochs * sampler.batches_per_epoch

    # ---- model (same seed everywhere: identical initialisation on every process) and the run skeleton
    torch.manual_seed(cfg.seed)
    num_tokens = (cfg.resolution // UNI_TILE) ** 2
    prior = UNIPrior(num_tokens, mean.numel(), labels=dataset.label_names or None, **cfg.prior)
    prior.set_data_stats(mean, std)
    info = dict(
        train_samples=len(dataset), tokens=num_tokens, channels=mean.numel(), labels=dataset.label_names
    )
    run = start_run(
        accelerator,
        RunSettings.from_config(cfg),
        work_dir,
        prior,
        total_steps,
        resume,
        generator_name="generator",
        info=info,
    )
    model, unwrapped, state, gen = run.model, run.unwrapped, run.state, run.generator

    def save(step: int) -> None:
        """A checkpoint, then the prior for sampling, `<work_dir>/prior/` (EMA weights), written atomically."""
        run.save(step)
        if is_main:
            with run.ema_weights(), atomic_path(work_dir / "prior") as tmp:
                unwrapped.save_pretrained(tmp)

    batch_stream = BatchStream(loader, sampler, state)
    null = len(dataset.label_names)
    log.info(
        "training %d steps on %d samples of %d token(s) x %d (%s), %d process(es) x batch %d",
        total_steps,
        len(dataset),
        num_tokens,
        mean.numel(),
        describe_labels(cfg.label_from),
        accelerator.num_processes,
        cfg.train_batch_size,
    )
    with run.loop(save, args.time_limit, desc="UNI prior") as loop:
        while state["step"] < total_steps and not loop.should_stop(state["step"]):
            batch = next(batch_stream)
            if batch is None:  # every sample of the batch failed to load (logged and counted by the dataset)
                continue
            x1 = unwrapped.standardise(batch["uni"].to(device))  # (B, T, C)
            labels = None
            if null:  # labelled prior: unlabelled samples and a random `label_dropout` get the null label
                labels = batch["label"].to(device)
                drop = torch.rand(labels.shape, generator=gen, device=device) < cfg.label_dropout
                labels = torch.where((labels == NO_LABEL) | drop, torch.full_like(labels, null), labels)
            x0 = torch.randn(x1.shape, generator=gen, device=device)
            loss = flow_matching_loss(model, x0, x1, generator=gen, labels=labels)
            accelerator.backward(loss)
            grad_norm, step = run.optimizer_step(cfg.gradient_clip)
            loop.log_step(step, loss, run.lr, grad_norm, images=len(x1) * accelerator.num_processes)
            loop.save_if_due(step)
    return run.finish()


def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input is one `error:` line and exit status 2, as for every tool."""
    return run_cli(lambda a: run_trainer(main, parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(cli())
