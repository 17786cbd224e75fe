"""Train the IHC LoRA of PixCell-1024: IHC images conditioned on their own UNI2-h embeddings, under accelerate.

    accelerate launch -m virtual_staining.train_lora configs/virtual_staining/lora_mist.py \\
        --data-root /data/MIST --stain HER2 --work-dir work_dirs/lora_mist_her2 \\
        --cfg-options uni=/weights/uni2h/pytorch_model.bin vae=/weights/sd35_vae

This is the project's one LoRA trainer (`train_scripts/train_lora.py`) with a virtual-staining config: the same
command works as `accelerate launch train_scripts/train_lora.py configs/virtual_staining/lora_mist.py ...`. What
this module adds is the paired data (`build_ihc_data`): the IHC images, their UNI tokens and the validation grid.

PixCell was never trained on IHC; a rank-4 adapter on its cross-attention (q, k, v, out) is enough to make it
generate IHC from IHC embeddings. The base transformer is frozen: only `lora_A` / `lora_B` train, and
checkpoints hold only them (plus optimizer, RNG, data position), never the 2.4 GB base. The UNI tokens of the
split are computed once and cached (`data.embeddings_dir`, shareable with the flow trainer); VAE latents are
encoded on the fly (a fresh posterior sample every step, as the original trainer did).

To resume, run the same command again. SIGTERM / SIGUSR1 and --time-limit save and stop. The adapter for
staining is written to `<work_dir>/lora.safetensors` at every checkpoint (diffusers LoRA layout, adapter only).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from diffusion.encoders import encode_posterior, latents_to_model, load_vae, to_uint8
from diffusion.geometry import UNI_TILE, VAE_FACTOR
from diffusion.training.run import run_trainer
from tools.cli import run_cli
from virtual_staining.data import read_image
from virtual_staining.training import split_embeddings

log = logging.getLogger("pixcell.train")


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


def build_ihc_data(cfg, model, accelerator, work_dir: Path):
    """The LoRA trainer's data for a virtual-staining config: IHC images (VAE-encoded on the fly, a fresh
    posterior sample every step, as the original trainer did) with their cached UNI tokens, and the validation
    grid [real IHC | sample from its own tokens]."""
    from train_scripts.train_lora import LoRAData

    c, device = model.config, accelerator.device
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
    vae = load_vae(cfg.vae).to(device).eval().requires_grad_(False)
    pairs, train = split_embeddings(cfg, accelerator, work_dir, cfg.data.train_split)
    if train.ihc.shape[1:] != (c.caption_num_tokens, c.caption_channels):
        raise ValueError(
            f"UNI tokens of shape {tuple(train.ihc.shape[1:])} per image, but {cfg.model} takes "
            f"({c.caption_num_tokens}, {c.caption_channels}) (check uni and data.image_size)"
        )
    dataset = IHCWithTokens([p.ihc for p in pairs], train.ihc, cfg.data.image_size)

    def inputs(batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ihc = batch["image"].to(device)
        if ihc.shape[-1] != model_px:  # data.resize_to_model (checked above)
            ihc = F.interpolate(ihc, size=(model_px, model_px), mode="bilinear", antialias=True)
        with torch.no_grad():
            mean, std = encode_posterior(vae, ihc)
            x0 = latents_to_model(mean + std * torch.randn(mean.shape, generator=gen, device=device), vae)
        return x0, batch["uni"].to(device)

    data = LoRAData(dataset, collate, inputs, what="IHC images", info={"train_images": len(dataset)})
    if cfg.validation.every_steps > 0:
        n = cfg.validation.num_images
        if cfg.data.val_split:
            val_pairs, val = split_embeddings(cfg, accelerator, work_dir, cfg.data.val_split)
            n = min(n, len(val_pairs))
            val_images = torch.stack([read_image(p.ihc, cfg.data.image_size) for p in val_pairs[:n]])
            val_tokens = val.ihc[:n].float()
        else:  # the last training images, never trained on
            data.held_out = list(range(len(dataset) - n, len(dataset)))
            val_images = torch.stack([dataset[i]["image"] for i in data.held_out])
            val_tokens = train.ihc[data.held_out].float()
        data.validation_grid = lambda m: validation_grid(
            m, vae, val_images, val_tokens, cfg, device, cfg.seed
        )
    return data


def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input is one `error:` line and exit status 2, as for every tool."""
    from train_scripts.train_lora import main, parse_args

    return run_cli(lambda a: run_trainer(main, parse_args(a, __doc__)), argv)


if __name__ == "__main__":
    sys.exit(cli())
