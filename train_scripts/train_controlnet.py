"""Train the PixCell cell-mask ControlNet on folders of (image, mask) pairs: one CPU to many GPUs, exact resume.

    accelerate launch train_scripts/train_controlnet.py configs/controlnet/pixcell_256_cell.py \
        --work-dir work_dirs/cell_controlnet --images data/images --masks data/masks [--uni hf-hub:MahmoodLab/UNI2-h]

The base PixCell transformer is frozen; the ControlNet (a copy of its first 27 blocks, zero-initialised control
layers) learns to steer it from the VAE latent of the mask, with the image's UNI2-h embedding as the style
condition: epsilon MSE on the 16 noise channels, AdamW, cosine schedule after warm-up, gradient clipping (the
published recipe, configs/_base_/controlnet.py). UNI features are read from `<name>_uni.npy` (the feature tools'
layout); with `--uni` the missing ones are written first. To resume, run the same command again (latest complete
checkpoint in the work dir); SIGTERM / SIGUSR1 / `--time-limit` save and stop. Checkpoints hold portable
`controlnet/` (and `controlnet_ema/`) folders that `PixCellControlNetPipeline.from_parts` loads. See
docs/controlnet.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from mmengine.config import Config
from torch.utils.data import DataLoader, default_collate

from diffusion.command import run_cli
from diffusion.config import build_model_from_config, load_config, parse_cfg_options, shipped_config
from diffusion.data.mask_pairs import MaskPairDataset, write_missing_uni
from diffusion.encoders import encode_posterior, latents_to_model, load_uni, load_vae, to_uint8
from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.model.controlnet import PixCellControlNet, controlled_forward, load_controlnet
from diffusion.model.loading import load_transformer
from diffusion.sampling.controlnet_pipeline import PixCellControlNetPipeline, check_pair
from diffusion.sampling.samplers import make_scheduler
from diffusion.training.precision import set_gradient_checkpointing
from diffusion.training.run import RunSettings, add_resume_args, launch, run_trainer, start_run
from diffusion.training.sampler import BatchStream, ResumableSampler
from diffusion.training.step import accumulate, noised_inputs
from diffusion.training.validation import fixed_noise, sample_column, validation_grid

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

log = logging.getLogger("pixcell.train")
SCHEMA = shipped_config("_base_/controlnet.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training config, e.g. configs/controlnet/pixcell_256_cell.py")
    p.add_argument("--work-dir", required=True, help="run folder: checkpoints, logs, validation images")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--images", default=None, help="folder of H&E patches (pairs.image_dir)")
    p.add_argument("--masks", default=None, help="folder of binary/instance mask PNGs (pairs.mask_dir)")
    p.add_argument("--features", default=None, help="folder of <name>_uni.npy (pairs.features_dir)")
    p.add_argument("--uni", default=None, help="UNI2-h source to write missing UNI features (pairs.uni)")
    p.add_argument("--base-model", default=None, help="frozen PixCell transformer (base_model)")
    p.add_argument("--vae", default=None, help="SD3.5 VAE: hub id or local folder (vae)")
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size (train_batch_size)")
    add_resume_args(p)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    options = parse_cfg_options(args.cfg_options)
    flags = {
        "images": "pairs.image_dir",
        "masks": "pairs.mask_dir",
        "features": "pairs.features_dir",
        "uni": "pairs.uni",
        "base_model": "base_model",
        "vae": "vae",
        "batch_size": "train_batch_size",
        "report_to": "report_to",
    }
    options.update({key: getattr(args, flag) for flag, key in flags.items() if getattr(args, flag)})
    cfg = load_config(args.config, options, schema_file=SCHEMA)
    for key in ("image_dir", "mask_dir"):
        if not cfg.pairs[key]:
            raise ValueError(
                f"pairs.{key} not set: pass --{'images' if key == 'image_dir' else 'masks'} FOLDER"
            )
    return cfg


#################################################################################
#                                   Models                                      #
#################################################################################


def build_models(cfg: Config, device: torch.device):
    """(frozen base transformer, trainable ControlNet, frozen VAE) as the config says."""
    expected = build_model_from_config(cfg)  # the preset: checks resolution and token count
    if cfg.base_model is None:
        log.warning("base_model is None: training against a RANDOM base transformer (tests and demos only)")
        base = expected
    else:
        base = load_transformer(cfg.base_model)
        own, want = dict(base.config), dict(expected.config)
        diff = [
            f"{k} {own.get(k)} vs {want[k]}"
            for k in (
                "sample_size",
                "caption_num_tokens",
                "caption_channels",
                "num_layers",
                "num_attention_heads",
            )
            if own.get(k) != want[k]
        ]
        if diff:
            raise ValueError(
                f"base_model {cfg.base_model} does not match model {cfg.model}: {'; '.join(diff)}"
            )
    base.requires_grad_(False).eval().to(device)

    c = cfg.controlnet
    if c.load_from:
        controlnet = load_controlnet(c.load_from)
        check_pair(base, controlnet)
    else:  # the published initialisation: the base's input path and first blocks, zero control layers
        controlnet = PixCellControlNet.from_transformer(base, n_controlnet_blocks=c.n_blocks)
    # Present in the published layout but outside the ControlNet's computation: no gradient (and DDP must not
    # wait for one). The published recipe also keeps the copied input patch embedding frozen.
    for module in (controlnet.norm_out, controlnet.proj_out):
        module.requires_grad_(False)
    controlnet.scale_shift_table.requires_grad_(False)
    if c.freeze_patch_embed:
        controlnet.pos_embed.requires_grad_(False)
    set_gradient_checkpointing(controlnet, cfg.gradient_checkpointing)
    controlnet.train()

    vae = load_vae(cfg.vae).to(device).eval().requires_grad_(False)
    return base, controlnet, vae


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> model-space latents (B, 16, H/8, W/8): posterior mean, as published."""
    mean, _ = encode_posterior(vae, images)
    return latents_to_model(mean, vae)


#################################################################################
#                               Validation grid                                 #
#################################################################################


@torch.no_grad()
def mask_grid(
    base: torch.nn.Module,
    controlnet: torch.nn.Module,
    vae: torch.nn.Module,
    held_out: list[dict],
    cfg: Config,
) -> np.ndarray:
    """Rows of [mask | reference image | samples...] for fixed held-out pairs and noise: uint8 (N*H, (2+k)*W, 3).

    The reference is the image whose UNI embedding conditions the samples; the mask sets their layout.
    """
    v, k = cfg.validation, cfg.validation.samples_per_mask
    device = next(base.parameters()).device
    pipe = PixCellControlNetPipeline(base, controlnet, vae, make_scheduler("dpm-solver"))
    uni = torch.stack([h["uni"] for h in held_out]).repeat_interleave(k, 0).to(device)
    masks = torch.stack([h["mask"] for h in held_out]).repeat_interleave(k, 0)
    noise = fixed_noise(base, len(uni), cfg.seed, device)
    scale = cfg.controlnet.conditioning_scale
    samples = sample_column(
        pipe,
        uni,
        noise,
        v.guidance_scale,
        v.num_inference_steps,
        mask=masks,
        controlnet_conditioning_scale=scale,
    )
    columns = [
        to_uint8(torch.stack([h["mask"] for h in held_out])),
        to_uint8(torch.stack([h["image"] for h in held_out])),
    ]
    columns += [samples[j::k] for j in range(k)]
    return validation_grid(columns)


#################################################################################
#                                    Main                                       #
#################################################################################


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    work_dir = Path(args.work_dir)
    accelerator, resume = launch(
        work_dir,
        args.resume_from,
        cfg.mixed_precision,
        ddp_only="train_controlnet: DDP only (the frozen base is replicated, the ControlNet is small)",
    )
    is_main, device = accelerator.is_main_process, accelerator.device

    # ---- models (same seed everywhere: identical ControlNet initialisation on every process)
    torch.manual_seed(cfg.seed)
    base, controlnet, vae = build_models(cfg, device)

    # ---- data (UNI features written first when a UNI source is given, by the main process)
    p = cfg.pairs
    uni_dim = base.config.caption_channels

    def pairs(require_uni: bool) -> MaskPairDataset:
        return MaskPairDataset(
            p.image_dir,
            p.mask_dir,
            p.features_dir,
            size=cfg.resolution,
            uni_dim=uni_dim,
            max_failure_rate=p.max_failure_rate,
            require_uni=require_uni,
        )

    if p.uni and is_main:
        written = write_missing_uni(pairs(require_uni=False), load_uni(p.uni, device=device))
        log.info("wrote %d missing UNI feature files with %s", written, p.uni)
    accelerator.wait_for_everyone()
    dataset = pairs(require_uni=True)
    validate = cfg.validation.every_steps > 0
    held_out_idx = list(range(len(dataset) - cfg.validation.num_images, len(dataset))) if validate else []
    sampler = ResumableSampler(
        len(dataset),
        cfg.train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        seed=cfg.seed,
        exclude=held_out_idx,
    )
    collate = lambda items: default_collate([{k: v for k, v in it.items() if k != "name"} for it in items])  # noqa: E731
    loader = DataLoader(
        dataset,
        batch_size=cfg.train_batch_size,
        sampler=sampler,
        num_workers=p.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    accum = cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps or cfg.num_epochs * sampler.batches_per_epoch // accum
    if total_steps < 1:
        raise ValueError(f"config: no steps to train ({sampler.batches_per_epoch} batches per epoch)")

    # ---- optimisation, EMA, noise, checkpoints, counters (restored when resuming)
    run = start_run(
        accelerator,
        RunSettings.from_config(cfg),
        work_dir,
        controlnet,
        total_steps,
        resume,
        counters=dict(nonfinite_total=0, images_seen=0),
        info=dict(pairs=len(dataset)),
    )
    model, unwrapped, state, noise_gen = run.model, run.unwrapped, run.state, run.generator
    diffusion = GaussianDiffusion()
    held_out = [dataset[i] for i in held_out_idx] if is_main else []

    def save(step: int) -> Path:
        portable = {"controlnet": (unwrapped, accelerator.get_state_dict(model))}
        if run.ema is not None:
            with run.ema_weights():
                portable["controlnet_ema"] = (unwrapped, accelerator.get_state_dict(model))
        return run.save(step, portable=portable)

    batch_stream = BatchStream(loader, sampler, state)
    log.info(
        "training %d steps: %d process(es) x batch %d x accumulation %d, %d pairs",
        total_steps,
        accelerator.num_processes,
        cfg.train_batch_size,
        accum,
        len(dataset),
    )
    with run.loop(save, args.time_limit) as loop:
        while state["step"] < total_steps and not loop.should_stop(state["step"]):
            batches = [next(batch_stream) for _ in range(accum)]

            # ---- forward / backward: base frozen, eps MSE on the 16 noise channels (published objective)
            def loss_of(batch: dict) -> tuple[torch.Tensor, int]:
                x0 = encode(vae, batch["image"].to(device))  # (B, 16, h, w)
                mask_latents = encode(vae, batch["mask"].to(device))  # (B, 16, h, w)
                x_t, t, noise, uni = noised_inputs(
                    diffusion,
                    x0,
                    batch["uni"].to(device),
                    noise_gen,
                    cfg.class_dropout_prob,
                    base.drop_condition,
                )
                with accelerator.autocast():
                    # through the DDP wrapper `model`, so the ControlNet's gradients are synchronised
                    out = controlled_forward(
                        base, model, x_t, mask_latents, uni, t, cfg.controlnet.conditioning_scale
                    )
                    return ((out[:, : x0.shape[1]].float() - noise) ** 2).mean(), len(x0)

            loss, images = accumulate(accelerator, model, batches, loss_of)
            grad_norm, step = run.optimizer_step(cfg.gradient_clip)
            state["images_seen"] += images * accelerator.num_processes

            # ---- report, validate, save
            loop.log_step(
                step, loss, run.lr, grad_norm, images=images * accelerator.num_processes, show_rate=False
            )
            if validate and is_main and step % cfg.validation.every_steps == 0:
                grid = run.ema_eval(lambda: mask_grid(base, unwrapped, vae, held_out, cfg))
                loop.save_grid("validation/mask_reference_samples", grid, step)
            loop.save_if_due(step)
    return run.finish()


def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input is one `error:` line and exit status 2, as for every tool."""
    return run_cli(lambda a: run_trainer(main, parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(cli())
