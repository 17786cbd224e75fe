"""LoRA fine-tuning of PixCell: a frozen base transformer, a peft adapter trained on your data, under accelerate.

    # your extracted features (npy or packed), any stage: the base model's size fixes 256 / 512 / 1024 px
    accelerate launch train_scripts/train_lora.py configs/lora/pixcell_256.py \\
        --load-from StonyBrook-CVLab/PixCell-256 --data-root /data/patches --work-dir work_dirs/lora_256
    # the virtual-staining adapters: the same trainer on paired H&E / IHC images (MIST, HER2Match)
    accelerate launch train_scripts/train_lora.py configs/virtual_staining/lora_mist.py --stain HER2 \\
        --load-from StonyBrook-CVLab/PixCell-1024 --data-root /data/MIST --work-dir work_dirs/lora_her2

A config's `task` picks the data: "features" (`configs/_base_/lora.py`: latents and UNI tokens stored beside the
patches, as train_pixcell.py reads them) or "virtual_staining" (`configs/virtual_staining/_base_/lora.py`: IHC
images conditioned on their own UNI tokens, built by `diffusion.data.ihc_tokens.build_ihc_data`). The rest is one loop: rank,
alpha and target modules (self-attention, cross-attention, feed-forward) from `lora`, only `lora_A`/`lora_B`
train, checkpoints hold only them (plus optimizer, RNG, data position), never the base weights. To resume, run
the same command again (bit-exact on the same hardware). SIGTERM / SIGUSR1 and --time-limit save and stop.

The adapter is written to `<work_dir>/lora.safetensors` at every checkpoint (diffusers LoRA layout, adapter
only): sample with it (`tools/sample.py --lora`), merge it into a full pipeline folder
(`tools/export_pipeline.py BASE OUT --lora ...`), or export it to the published staining layout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from mmengine.config import Config
from torch import Tensor
from torch.utils.data import DataLoader

from diffusion.command import run_cli
from diffusion.config import load_strict_config, parse_cfg_options, resolve_latent_norm, shipped_config
from diffusion.data.datasets import (
    PatchFeatureDataset,
    check_data_matches_model,
    collate_skip_none,
    held_out_samples,
)
from diffusion.data.ihc_tokens import IHCDataSettings, build_ihc_data, load_staining_config
from diffusion.encoders import load_vae
from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.geometry import VAE_FACTOR, latent_norm, resolve_norm, to_model_latents
from diffusion.model.loading import load_transformer
from diffusion.model.lora import LoRASettings, add_lora, lora_parameters, save_lora_weights
from diffusion.training.checkpoint import register_lora_checkpoint_hooks
from diffusion.training.precision import set_gradient_checkpointing
from diffusion.training.run import RunSettings, add_resume_args, launch, run_trainer, start_run
from diffusion.training.sampler import BatchStream, ResumableSampler
from diffusion.training.step import accumulate, noised_inputs
from diffusion.training.task import TaskData
from diffusion.training.validation import held_out_grid

if TYPE_CHECKING:
    from accelerate import Accelerator

    from diffusion.model.pixcell_transformer import PixCellTransformer2DModel

log = logging.getLogger("pixcell.train")
SCHEMAS = {"features": "_base_/lora.py", "virtual_staining": "virtual_staining/_base_/lora.py"}
LOSSES = ("mse", "hybrid")


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="LoRA config, e.g. configs/lora/pixcell_256.py")
    p.add_argument("--work-dir", required=True, help="run folder: checkpoints, logs, lora.safetensors")
    p.add_argument(
        "--load-from", default=None, help="base transformer: hub id, diffusers folder, .pth, work dir"
    )
    p.add_argument("--data-root", default=None, help="patches root (features) or MIST / HER2Match folder")
    p.add_argument(
        "--stain", default=None, help="virtual staining: MIST HER2, ER, PR, Ki67 (HER2Match: HER2)"
    )
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    add_resume_args(p)
    return p.parse_args(argv)


def load_lora_config(args: argparse.Namespace) -> Config:
    """The config, checked against the schema of its `task`, with the command-line overrides applied."""
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"config {path}: no such file")
    options = parse_cfg_options(args.cfg_options)
    task = options.get("task") or Config.fromfile(str(path)).get("task", "features")
    if task not in SCHEMAS:
        raise ValueError(f"{path}: task {task!r}; expected one of {', '.join(SCHEMAS)}")
    for key, value in (("data.root", args.data_root), ("report_to", args.report_to)):
        if value is not None:
            options[key] = value
    if task == "virtual_staining":
        if args.stain is not None:
            options["stain"] = args.stain
        return load_staining_config(path, options, "lora")
    if args.stain is not None:
        raise ValueError("--stain: only for virtual-staining configs (task 'virtual_staining')")
    cfg = load_strict_config(path, shipped_config(SCHEMAS[task]), options)
    if not cfg.data.root:
        raise ValueError("data root not set: pass --data-root (the patches folder)")
    # the one latent normalisation (diffusion/geometry.py): configured, else recorded beside the features
    cfg.vae_shift, cfg.vae_scale = resolve_latent_norm(cfg)
    return cfg


#################################################################################
#                 What a task gives the loop: data, inputs, validation           #
#################################################################################


def build_features_data(
    cfg: Config, model: PixCellTransformer2DModel, accelerator: Accelerator, work_dir: Path
) -> TaskData:
    """Stored VAE latents + UNI tokens (`PatchFeatureDataset`) at the base model's resolution."""
    d, device = cfg.data, accelerator.device
    resolution = model.config.sample_size * VAE_FACTOR
    dataset = PatchFeatureDataset(
        root=d.root,
        index_file=d.index_file,
        dataset_keys=d.dataset_keys,
        resolution=resolution,
        parent_size=d.parent_size,
        feature_format=d.feature_format,
        features_root=d.features_root,
        seed=cfg.seed,
        max_failure_rate=d.max_failure_rate,
    )
    check_data_matches_model(dataset, model, resolution, str(cfg.load_from))

    def inputs(batch: dict, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x0 = to_model_latents(batch["latent"].to(device), cfg.vae_shift, cfg.vae_scale)
        return x0, batch["uni"].to(device)

    data = TaskData(dataset, collate_skip_none, inputs, info={"resolution": resolution})
    v = cfg.validation
    if v.every_steps > 0:
        data.held_out = list(range(len(dataset) - v.num_images, len(dataset)))  # same exclusion on every rank
    if v.every_steps > 0 and accelerator.is_main_process:
        vae = load_vae(v.vae).to(device).eval()
        # validation decodes with the VAE's own normalisation: it must be the run's (as in train_pixcell.py)
        resolve_norm((cfg.vae_shift, cfg.vae_scale), latent_norm(vae), f"validation.vae {v.vae}")
        held = held_out_samples(dataset, data.held_out, resolution)
        norm = (cfg.vae_shift, cfg.vae_scale)
        data.validation_grid = lambda m: held_out_grid(
            m, vae, held, norm, v.guidance_scale, v.num_inference_steps, cfg.seed
        )
    return data


def build_data(
    cfg: Config, model: PixCellTransformer2DModel, accelerator: Accelerator, work_dir: Path
) -> TaskData:
    if cfg.task == "virtual_staining":
        return build_ihc_data(IHCDataSettings.from_config(cfg, work_dir), model, str(cfg.model), accelerator)
    return build_features_data(cfg, model, accelerator, work_dir)


#################################################################################
#                                    Main                                       #
#################################################################################


def main(args: argparse.Namespace) -> int:
    cfg = load_lora_config(args)
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss {cfg.loss!r}: expected one of {', '.join(LOSSES)}")
    base = args.load_from or (cfg.model if cfg.task == "virtual_staining" else cfg.load_from)
    if not base:
        raise ValueError(
            "no base model: pass --load-from (hub id, diffusers folder, original .pth or work dir)"
        )
    work_dir = Path(args.work_dir)
    accelerator, resume = launch(work_dir, args.resume_from, cfg.mixed_precision)
    is_main, device = accelerator.is_main_process, accelerator.device

    # ---- the frozen base, its data, then the adapter (same seed on every process: identical init)
    model = load_transformer(base, ema=cfg.get("load_ema", True))
    data = build_data(cfg, model, accelerator, work_dir)
    torch.manual_seed(cfg.seed)
    settings = LoRASettings(cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets), cfg.lora.dropout)
    add_lora(model, settings)
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    model.train()
    n_lora = sum(p.numel() for p in lora_parameters(model))

    sampler = ResumableSampler(
        len(data.dataset),
        cfg.train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        seed=cfg.seed,
        exclude=data.held_out,
    )
    loader = DataLoader(
        data.dataset,
        batch_size=cfg.train_batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=data.collate,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    accum = cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps or cfg.num_epochs * sampler.batches_per_epoch // accum
    if total_steps < 1:
        raise ValueError(
            f"no steps to train ({sampler.batches_per_epoch} batches per epoch, accumulation {accum})"
        )

    # ---- optimisation of the LoRA parameters only (and the EMA of them), noise, checkpoints, counters
    register_lora_checkpoint_hooks(accelerator)  # checkpoints hold the adapter, not the frozen base
    run = start_run(
        accelerator,
        RunSettings.from_config(cfg),
        work_dir,
        model,
        total_steps,
        resume,
        params=lora_parameters(model),
        counters=dict(skipped_samples=0),
        generator_name="generator",
        info=dict(
            train_samples=len(data.dataset),
            base_model=str(base),
            lora_parameters=n_lora,
            lora_targets=list(settings.targets),
            **data.info,
        ),
    )
    model, unwrapped, state, gen = run.model, run.unwrapped, run.state, run.generator
    diffusion = GaussianDiffusion()

    def save(step: int) -> None:
        run.save(step)
        if is_main:
            with run.ema_weights():
                save_lora_weights(unwrapped, work_dir / "lora.safetensors")

    batch_stream = BatchStream(loader, sampler, state)
    max_skipped = max(1, int(cfg.data.max_failure_rate * len(data.dataset)))
    validate = data.validation_grid is not None and cfg.validation.every_steps > 0
    log.info(
        "training %d steps: %d process(es) x batch %d x accumulation %d, %d %s, %d LoRA parameters (rank %d "
        "on %s)",
        total_steps,
        accelerator.num_processes,
        cfg.train_batch_size,
        accum,
        len(data.dataset),
        data.what,
        n_lora,
        settings.rank,
        ", ".join(settings.targets),
    )
    with run.loop(save, args.time_limit, desc="LoRA") as loop:
        while state["step"] < total_steps and not loop.should_stop(state["step"]):
            batches = [next(batch_stream) for _ in range(accum)]

            def loss_of(batch: dict | None) -> tuple[Tensor, int] | None:
                state["skipped_samples"] += batch["skipped"] if batch is not None else cfg.train_batch_size
                if state["skipped_samples"] > max_skipped:
                    raise RuntimeError(
                        f"{state['skipped_samples']} unreadable {data.what}, more than data.max_failure_rate="
                        f"{cfg.data.max_failure_rate} of {len(data.dataset)} (see the warnings above)"
                    )
                if batch is None or "uni" not in batch:  # a whole micro-batch unreadable: nothing to learn
                    if accelerator.num_processes > 1:  # the other processes would wait in backward forever
                        raise RuntimeError(
                            f"step {state['step']}: a whole batch of {data.what} was unreadable"
                        )
                    return None
                x0, uni = data.inputs(batch, gen)
                # the null condition goes through the model's own path, as a real one does
                x_t, t, noise, uni = noised_inputs(
                    diffusion, x0, uni, gen, cfg.class_dropout_prob, unwrapped.drop_condition
                )
                with accelerator.autocast():
                    out = model(x_t, uni, t, return_dict=False)[0]
                terms = diffusion.training_losses(out.float(), x0, x_t, t, noise)
                return (terms.mse if cfg.loss == "mse" else terms.loss).mean(), len(x0)

            loss, images = accumulate(accelerator, model, batches, loss_of)
            if loss is None:
                continue
            grad_norm, step = run.optimizer_step(cfg.gradient_clip, params=lora_parameters(model))

            loop.log_step(
                step,
                loss,
                run.lr,
                grad_norm,
                images=images * accelerator.num_processes,
                scalars={"train/skipped_samples": state["skipped_samples"]},
            )
            if validate and is_main and (step % cfg.validation.every_steps == 0 or step == total_steps):
                grid = run.ema_eval(lambda: data.validation_grid(unwrapped))
                loop.save_grid("validation/real_vs_generated", grid, step)
            loop.save_if_due(step)
    return run.finish()


def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input is one `error:` line and exit status 2, as for every tool."""
    return run_cli(lambda a: run_trainer(main, parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(cli())
