"""Train the IHC LoRA of PixCell-1024: IHC images conditioned on their own UNI2-h embeddings, under accelerate.

    accelerate launch -m virtual_staining.train_lora configs/virtual_staining/lora_mist.py \\
        --data-root /data/MIST --stain HER2 --work-dir work_dirs/lora_mist_her2 \\
        --cfg-options uni=/weights/uni2h/pytorch_model.bin vae=/weights/sd35_vae

PixCell was never trained on IHC; a rank-4 adapter on its cross-attention (q, k, v, out) is enough to make it
generate IHC from IHC embeddings. The base transformer is frozen: only `lora_A` / `lora_B` train, and
checkpoints hold only them (plus optimizer, RNG, data position), never the 2.4 GB base. The UNI tokens of the
split are computed once and cached (`data.embeddings_dir`, shareable with the flow trainer); VAE latents are
encoded on the fly (a fresh posterior sample every step, as the original trainer did).

To resume, run the same command again. SIGTERM / SIGUSR1 and --time-limit save and stop. The adapter for
staining is written to `<work_dir>/lora.safetensors` at every checkpoint (diffusers LoRA layout, adapter only).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from diffusion.encoders import encode_posterior, latents_to_model, load_vae, to_uint8
from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.geometry import UNI_TILE, VAE_FACTOR
from diffusion.model.loading import load_transformer
from diffusion.training.precision import set_gradient_checkpointing
from diffusion.training.run import launch, run_trainer, start_run
from diffusion.training.sampler import BatchStream, ResumableSampler
from diffusion.training.step import accumulate, noised_inputs
from tools.cli import run_cli
from virtual_staining.data import read_image
from virtual_staining.lora import LoRASettings, add_lora, lora_parameters, save_lora_weights
from virtual_staining.training import (
    load_run_config,
    parse_args,
    register_lora_checkpoint_hooks,
    split_embeddings,
)

log = logging.getLogger("pixcell.train")
LOSSES = ("mse", "hybrid")


class IHCWithTokens(Dataset):
    """{'image': (3, S, S) IHC image in [0, 1], 'uni': (T, C) its UNI tokens}; None for an unreadable image."""

    def __init__(self, paths: list[Path], tokens: torch.Tensor, size: int):
        self.paths, self.tokens, self.size = paths, tokens, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict | None:
        try:
            image = read_image(self.paths[i], self.size)
        except (ValueError, FileNotFoundError) as err:  # counted by the loop, which stops past a threshold
            log.warning("skipped %s", err)
            return None
        return {"image": image, "uni": self.tokens[i].float()}


def collate(items: list[dict | None]) -> dict:
    good = [x for x in items if x is not None]
    out = {"skipped": len(items) - len(good)}
    if good:
        out["image"] = torch.stack([x["image"] for x in good])
        out["uni"] = torch.stack([x["uni"] for x in good])
    return out


@torch.no_grad()
def validation_grid(
    transformer, vae, images: torch.Tensor, tokens: torch.Tensor, cfg, device, seed: int
) -> np.ndarray:
    """Rows of [real IHC | sample from its UNI tokens], fixed noise: uint8 (N*S, 2*S, 3)."""
    from diffusion.sampling.pipeline import PixCellPipeline
    from diffusion.sampling.samplers import make_scheduler

    v = cfg.validation
    pipe = PixCellPipeline(transformer=transformer, vae=vae, scheduler=make_scheduler("dpm-solver"))
    size = transformer.config.sample_size
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(tokens), transformer.config.in_channels, size, size, generator=g).to(device)
    fake = pipe(tokens.to(device), guidance_scale=v.guidance_scale, num_inference_steps=v.num_inference_steps,
                latents=latents, output_type="pt", progress=False).images  # fmt: skip
    real = F.interpolate(images, size=fake.shape[-2:], mode="bilinear", antialias=True)
    return np.concatenate(
        [np.concatenate(pair, axis=1) for pair in zip(to_uint8(real), to_uint8(fake))], axis=0
    )


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args, "lora")
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss {cfg.loss!r}: expected one of {', '.join(LOSSES)}")
    work_dir = Path(args.work_dir)
    accelerator, resume = launch(work_dir, args.resume_from, cfg.mixed_precision)
    is_main, device = accelerator.is_main_process, accelerator.device

    # ---- frozen parts: base transformer + adapter, VAE
    model = load_transformer(cfg.model)
    c = model.config
    model_px = c.sample_size * VAE_FACTOR
    if cfg.data.image_size != model_px and not cfg.data.resize_to_model:
        raise ValueError(
            f"data.image_size {cfg.data.image_size} px, but {cfg.model} generates {model_px} px images "
            "(use images of the model's size, or data.resize_to_model=True)"
        )
    if (cfg.data.image_size // UNI_TILE) ** 2 != c.caption_num_tokens:
        raise ValueError(
            f"data.image_size {cfg.data.image_size} px gives {(cfg.data.image_size // UNI_TILE) ** 2} UNI tokens, but "
            f"{cfg.model} takes {c.caption_num_tokens}"
        )
    torch.manual_seed(cfg.seed)  # the adapter's gaussian init: identical on every process
    add_lora(model, LoRASettings(cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets), cfg.lora.dropout))
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    model.train()
    vae = load_vae(cfg.vae).to(device).eval().requires_grad_(False)

    # ---- data: IHC images + their cached UNI tokens
    pairs, train = split_embeddings(cfg, accelerator, work_dir, cfg.data.train_split)
    if train.ihc.shape[1:] != (c.caption_num_tokens, c.caption_channels):
        raise ValueError(
            f"UNI tokens of shape {tuple(train.ihc.shape[1:])} per image, but {cfg.model} takes "
            f"({c.caption_num_tokens}, {c.caption_channels}) (check uni and data.image_size)"
        )
    dataset = IHCWithTokens([p.ihc for p in pairs], train.ihc, cfg.data.image_size)
    validate = cfg.validation.every_steps > 0
    held_out: list[int] = []
    val_images = val_tokens = None
    if validate:
        if cfg.data.val_split:
            val_pairs, val = split_embeddings(cfg, accelerator, work_dir, cfg.data.val_split)
            n = min(cfg.validation.num_images, len(val_pairs))
            val_images = torch.stack([read_image(p.ihc, cfg.data.image_size) for p in val_pairs[:n]])
            val_tokens = val.ihc[:n].float()
        else:  # the last training images, never trained on
            held_out = list(range(len(dataset) - cfg.validation.num_images, len(dataset)))
            val_images = torch.stack([dataset[i]["image"] for i in held_out])
            val_tokens = train.ihc[held_out].float()
    sampler = ResumableSampler(len(dataset), cfg.train_batch_size, accelerator.num_processes,
                               accelerator.process_index, seed=cfg.seed, exclude=held_out)  # fmt: skip
    loader = DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True)  # fmt: skip
    accum = cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps or cfg.num_epochs * sampler.batches_per_epoch // accum
    if total_steps < 1:
        raise ValueError(
            f"no steps to train ({sampler.batches_per_epoch} batches per epoch, accumulation {accum})"
        )

    # ---- optimisation of the LoRA parameters only (and the EMA of them), noise, checkpoints, counters
    register_lora_checkpoint_hooks(accelerator)  # checkpoints hold the adapter, not the frozen base
    run = start_run(accelerator, cfg, work_dir, model, total_steps, resume, params=lora_parameters(model),
                    counters=dict(skipped_samples=0, nonfinite_total=0), generator_name="generator",
                    info=dict(train_images=len(dataset), lora_parameters=sum(p.numel() for p in lora_parameters(model))))  # fmt: skip
    model, unwrapped, state, gen = run.model, run.unwrapped, run.state, run.generator
    diffusion = GaussianDiffusion()

    def save(step: int) -> None:
        run.save(step)
        if is_main:
            with run.ema_weights():
                save_lora_weights(unwrapped, work_dir / "lora.safetensors")

    batch_stream = BatchStream(loader, sampler, state)
    max_skipped = max(1, int(cfg.data.max_failure_rate * len(dataset)))
    log.info("training %d steps: %d process(es) x batch %d x accumulation %d, %d IHC images, %d LoRA parameters",
             total_steps, accelerator.num_processes, cfg.train_batch_size, accum, len(dataset),
             sum(p.numel() for p in lora_parameters(unwrapped)))  # fmt: skip
    with run.loop(save, args.time_limit, desc="LoRA") as loop:
        while state["step"] < total_steps and not loop.should_stop(state["step"]):
            batches = [next(batch_stream) for _ in range(accum)]

            def loss_of(batch: dict) -> tuple[torch.Tensor, int] | None:
                state["skipped_samples"] += batch["skipped"]
                if state["skipped_samples"] > max_skipped:
                    raise RuntimeError(
                        f"{state['skipped_samples']} unreadable IHC images, more than data.max_failure_rate="
                        f"{cfg.data.max_failure_rate} of {len(dataset)} (see the warnings above)"
                    )
                if "image" not in batch:  # a whole micro-batch unreadable: nothing to learn from it
                    if accelerator.num_processes > 1:  # the other processes would wait in backward forever
                        raise RuntimeError(
                            f"step {state['step']}: a whole batch of IHC images was unreadable"
                        )
                    return None
                ihc = batch["image"].to(device)
                if ihc.shape[-1] != model_px:  # data.resize_to_model (checked above)
                    ihc = F.interpolate(ihc, size=(model_px, model_px), mode="bilinear", antialias=True)
                with torch.no_grad():
                    mean, std = encode_posterior(vae, ihc)
                    x0 = latents_to_model(
                        mean + std * torch.randn(mean.shape, generator=gen, device=device), vae
                    )
                x_t, t, noise, uni = noised_inputs(diffusion, x0, batch["uni"].to(device), gen,
                                                   cfg.class_dropout_prob, unwrapped.drop_condition)  # fmt: skip
                with accelerator.autocast():
                    out = model(x_t, uni, t, return_dict=False)[0]
                terms = diffusion.training_losses(out.float(), x0, x_t, t, noise)
                return (terms.mse if cfg.loss == "mse" else terms.loss).mean(), len(x0)

            loss, images = accumulate(accelerator, model, batches, loss_of)
            if loss is None:
                continue
            grad_norm, step = run.optimizer_step(cfg.gradient_clip, params=lora_parameters(model))

            loop.log_step(step, loss, run.lr, grad_norm,
                          images=images * accelerator.num_processes,
                          scalars={"train/skipped_samples": state["skipped_samples"]})  # fmt: skip
            if validate and is_main and (step % cfg.validation.every_steps == 0 or step == total_steps):
                model.eval()
                with run.ema_weights():
                    grid = validation_grid(unwrapped, vae, val_images, val_tokens, cfg, device, cfg.seed)
                model.train()
                loop.save_grid("validation/real_vs_generated", grid, step)
            loop.save_if_due(step)
    return run.finish()


def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input is one `error:` line and exit status 2, as for every tool."""
    return run_cli(lambda a: run_trainer(main, parse_args(a, __doc__)), argv)


if __name__ == "__main__":
    sys.exit(cli())
