"""Train PixCell: one CPU to many GPU nodes, the three progressive stages, exact resume.

    accelerate launch train_scripts/train_pixcell.py configs/pan_cancer/pixcell_256.py --work-dir work_dirs/p256 \
        --data-root /data/patches
    accelerate launch train_scripts/train_pixcell.py configs/pan_cancer/pixcell_512.py --work-dir work_dirs/p512 \
        --data-root /data/patches --load-from work_dirs/p256

DDP by default; FSDP and DeepSpeed (ZeRO-1/2) come from the accelerate config (`accelerate config`). To resume,
run the same command again: it continues from the latest complete checkpoint in the work dir, bit-for-bit on the
same hardware and process count (`--resume-from` picks another checkpoint). SIGTERM / SIGUSR1 (SLURM
pre-emption) and `--time-limit` save a checkpoint and exit cleanly. See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffusion.command import run_cli
from diffusion.config import build_model_from_config, load_config, parse_cfg_options
from diffusion.data.datasets import (
    PatchFeatureDataset,
    check_data_matches_model,
    collate_skip_none,
    held_out_samples,
)
from diffusion.data.shards import SHARDS_DIRNAME, ShardStream
from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.geometry import latent_norm, resolve_norm, to_model_latents
from diffusion.model.pixcell_transformer import compile_blocks
from diffusion.training.fsdp import fsdp_settings, full_state_dict
from diffusion.training.init import initialise_from
from diffusion.training.precision import set_fp32_attention, set_gradient_checkpointing
from diffusion.training.run import RunSettings, add_resume_args, is_sharded, launch, run_trainer, start_run
from diffusion.training.sampler import BatchStream, ResumableSampler
from diffusion.training.step import accumulate, noised_inputs
from diffusion.training.validation import held_out_grid

log = logging.getLogger("pixcell.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training config, e.g. configs/pan_cancer/pixcell_256.py")
    p.add_argument("--work-dir", required=True, help="run folder: checkpoints, logs, validation images")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--data-root", default=None, help="patches root (default: $PIXCELL_DATA_ROOT)")
    p.add_argument("--load-from", default=None, help="initialise from a previous stage / published weights")
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size (train_batch_size)")
    add_resume_args(p)
    return p.parse_args(argv)


#################################################################################
#                                    Main                                       #
#################################################################################


def main(args: argparse.Namespace) -> int:
    options = parse_cfg_options(args.cfg_options)
    if args.data_root:
        options["data.root"] = args.data_root
    if args.load_from:
        options["load_from"] = args.load_from
    if args.batch_size:
        options["train_batch_size"] = args.batch_size
    if args.report_to:
        options["report_to"] = args.report_to
    cfg = load_config(args.config, options)
    work_dir = Path(args.work_dir)
    fsdp = fsdp_settings(cfg)  # fully_shard (diffusion/training/fsdp.py), or None: accelerate's DDP / plugins
    accelerator, resume = launch(work_dir, args.resume_from, cfg.mixed_precision)
    is_main, device = accelerator.is_main_process, accelerator.device
    sharded = is_sharded(accelerator) or (fsdp is not None and accelerator.num_processes > 1)

    # ---- model (same seed on every process: identical initialisation and null condition)
    torch.manual_seed(cfg.seed)
    model = build_model_from_config(cfg)
    if cfg.load_from and resume is None:
        report = initialise_from(model, cfg.load_from, use_ema=cfg.load_ema)
        log.info(report.summary())
        if is_main:
            (work_dir / "init_report.txt").write_text(report.summary() + "\n")
    if cfg.fp32_attention and cfg.mixed_precision != "no":
        set_fp32_attention(model)
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    if compile_blocks(model, cfg.compile):
        log.info("compiled the transformer blocks (torch.compile %s)", cfg.compile)
    model.train()

    # ---- data
    d = cfg.data
    if not d.root:
        raise ValueError("data root not set: pass --data-root or set PIXCELL_DATA_ROOT (the patches folder)")
    validate = cfg.validation.every_steps > 0
    # streaming parquet shards (tools/pack_shards.py, diffusion/data/shards.py) or the indexed patches
    if d.feature_format == "shards":
        if validate:
            raise ValueError(
                "validation reads held-out patches by index: with data.feature_format 'shards' set "
                "validation.every_steps=0 (and validate from a checkpoint with tools.sample)"
            )
        folder = d.features_root or Path(d.root) / SHARDS_DIRNAME
        dataset = sampler = ShardStream(
            folder,
            cfg.resolution,
            cfg.train_batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            d.num_workers,
            seed=cfg.seed,
        )
        check_data_matches_model(dataset, model, cfg.resolution, str(cfg.model))
        loader = DataLoader(
            dataset,
            batch_size=cfg.train_batch_size,
            num_workers=d.num_workers,
            collate_fn=collate_skip_none,
            drop_last=True,
        )
    else:
        dataset = PatchFeatureDataset(
            root=d.root,
            index_file=d.index_file,
            dataset_keys=d.dataset_keys,
            resolution=cfg.resolution,
            parent_size=d.parent_size,
            feature_format=d.feature_format,
            features_root=d.features_root,
            seed=cfg.seed,
            max_failure_rate=d.max_failure_rate,
        )
        check_data_matches_model(dataset, model, cfg.resolution, str(cfg.model))
        held_out_idx = list(range(len(dataset) - cfg.validation.num_images, len(dataset)))
        sampler = ResumableSampler(
            len(dataset),
            cfg.train_batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            seed=cfg.seed,
            exclude=held_out_idx if validate else (),
        )
        loader = DataLoader(
            dataset,
            batch_size=cfg.train_batch_size,
            sampler=sampler,
            num_workers=d.num_workers,
            collate_fn=collate_skip_none,
            pin_memory=device.type == "cuda",
            drop_last=True,
        )
    accum = cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps or cfg.num_epochs * sampler.batches_per_epoch // accum
    if total_steps < 1:
        raise ValueError(
            f"config: no steps to train (max_steps {cfg.max_steps}, {sampler.batches_per_epoch} "
            f"batches per epoch, gradient_accumulation_steps {accum})"
        )

    # ---- optimisation, EMA, noise, checkpoints, counters (restored when resuming)
    run = start_run(
        accelerator,
        RunSettings.from_config(cfg),
        work_dir,
        model,
        total_steps,
        resume,
        sharded_ema=sharded,
        counters=dict(nonfinite_total=0, skipped_samples=0, images_seen=0),
        info=dict(dataset_samples=len(dataset)),
        fsdp=fsdp,
    )
    model, unwrapped, state, noise_gen = run.model, run.unwrapped, run.state, run.generator
    diffusion = GaussianDiffusion()

    # ---- validation material (fixed held-out conditions, their real crops, the VAE) on the main process
    vae, held_out = None, []
    if validate and (is_main or sharded):
        from diffusion.encoders import load_vae

        vae = load_vae(cfg.validation.vae).to(device).eval()
        # validation decodes (and the released pipeline samples) with the VAE's own normalisation: it must be the run's
        resolve_norm((cfg.vae_shift, cfg.vae_scale), latent_norm(vae), f"validation.vae {cfg.validation.vae}")
        held_out = held_out_samples(dataset, held_out_idx, cfg.resolution)
    val, norm = cfg.validation, (cfg.vae_shift, cfg.vae_scale)

    def save(step: int) -> Path:
        # full weights (a gather under FSDP: every process calls it)
        gather = accelerator.get_state_dict if fsdp is None else full_state_dict
        sd = gather(model)
        with run.ema_weights():
            sd_ema = gather(model)
        return run.save(
            step, portable={"transformer": (unwrapped, sd), "transformer_ema": (unwrapped, sd_ema)}
        )

    batch_stream = BatchStream(loader, sampler, state, set_epoch=dataset.set_epoch)
    log.info(
        "training %d steps: %d process(es) x batch %d x accumulation %d, %d samples, %d batches per epoch",
        total_steps,
        accelerator.num_processes,
        cfg.train_batch_size,
        accum,
        len(dataset),
        sampler.batches_per_epoch,
    )
    with run.loop(save, args.time_limit) as loop:
        while state["step"] < total_steps and not loop.should_stop(state["step"]):
            # ---- this step's micro-batches; skipped together when one failed to load on any process
            batches = run.next_batches(batch_stream, accum)
            if batches is None:
                continue

            # ---- forward / backward over the micro-batches (gradients synchronised on the last one only)
            def loss_of(batch: dict) -> tuple[torch.Tensor, int]:
                state["skipped_samples"] += batch["skipped"]
                x0 = to_model_latents(
                    batch["latent"].to(device), cfg.vae_shift, cfg.vae_scale
                )  # (B, 16, h, w)
                x_t, t, noise, uni = noised_inputs(
                    diffusion,
                    x0,
                    batch["uni"].to(device),
                    noise_gen,
                    cfg.class_dropout_prob,
                    unwrapped.drop_condition,
                )
                with accelerator.autocast():
                    out = model(x_t, uni, t, return_dict=False)[0]
                return diffusion.training_losses(out.float(), x0, x_t, t, noise).loss.mean(), len(x0)  # fp32

            loss, images = accumulate(accelerator, model, batches, loss_of)
            grad_norm, step = run.optimizer_step(cfg.gradient_clip)
            state["images_seen"] += images * accelerator.num_processes

            # ---- report, validate, save
            loop.log_step(
                step,
                loss,
                run.lr,
                grad_norm,
                images=images * accelerator.num_processes,
                scalars={
                    "train/nonfinite_steps": state["nonfinite_total"],
                    "train/skipped_samples": state["skipped_samples"],
                },
            )
            if validate and step % cfg.validation.every_steps == 0 and (is_main or sharded):
                grid = run.ema_eval(
                    lambda: held_out_grid(
                        unwrapped, vae, held_out, norm, val.guidance_scale, val.num_inference_steps, cfg.seed
                    )
                )
                if is_main:
                    loop.save_grid("validation/real_vs_ema", grid, step)
            loop.save_if_due(step)
    if state["step"] >= total_steps:
        log.info(
            "%d non-finite steps skipped, %d samples skipped",
            state["nonfinite_total"],
            state["skipped_samples"],
        )
    return run.finish()


def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input is one `error:` line and exit status 2, as for every tool."""
    return run_cli(lambda a: run_trainer(main, parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(cli())
