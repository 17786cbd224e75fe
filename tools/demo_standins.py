"""Stand-ins for the two gated encoders, for the CPU demo only (never used by the product's default path).

- VAE stand-in: a small 16-channel, f8 `AutoencoderKL` (the SD3.5 VAE's latent shape and shift/scale; no
  attention, so fully convolutional), trained for a few minutes on random 32 px crops of the demo's training
  tiles so that it reconstructs tissue recognisably.
- UNI2-h stand-in: a small randomly initialised ViT of the UNI2-h architecture family (96-d features, no layer
  scale). Random ViT features still separate colour and texture, which is all the demo's conditioning and
  metrics need.

Both are saved in the real models' on-disk formats and the demo loads them back through the real loaders
(`diffusion.encoders.load_vae` / `load_uni`). To use the real encoders instead, pass `--vae` / `--uni` to the
tools (hub ids `stabilityai/stable-diffusion-3.5-large` and `hf-hub:MahmoodLab/UNI2-h`, or local copies).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusion.atomic import atomic_path
from diffusion.encoders import build_tiny_uni, build_tiny_vae

VAE_CHANNELS = (32, 32, 64, 64)


def make_uni_standin(out_dir: str | Path, seed: int = 0) -> Path:
    """A random UNI2-h-shaped ViT (96-d), saved like UNI2-h (config.json + model.safetensors)."""
    out = Path(out_dir)
    if not (out / "config.json").is_file():
        with atomic_path(out) as tmp:
            build_tiny_uni(tmp, seed=seed, init_values=None)
    return out


def train_vae_standin(
    tiles: Sequence[str | Path],
    out_dir: str | Path,
    steps: int = 300,
    crop: int = 32,
    batch: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
) -> dict:
    """Train the small AutoencoderKL on random crops of `tiles` (L1 + a tiny KL, as a VAE warm start).

    The model is saved as a diffusers folder (`save_pretrained`, atomic) with `train_log.json` beside it.
    Returns {"steps", "l1_first", "l1_last", "shift_factor", "scaling_factor"}.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "train_log.json").is_file():
        return json.loads((out / "train_log.json").read_text())
    if not tiles:
        raise ValueError("no training tiles for the VAE stand-in")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    images = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in tiles]
    with atomic_path(out) as tmp:
        vae = build_tiny_vae(tmp, seed=seed, block_out_channels=VAE_CHANNELS, mid_attention=False).train()
        opt = torch.optim.AdamW(vae.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        losses = []
        for _ in tqdm(range(steps), desc="VAE stand-in", leave=False):
            crops = []
            for _ in range(batch):
                img = rng.choice(images)
                y, x = rng.randrange(img.shape[1] - crop + 1), rng.randrange(img.shape[2] - crop + 1)
                crop_t = img[:, y : y + crop, x : x + crop]
                if rng.random() < 0.5:  # flips: tissue has no orientation
                    crop_t = crop_t.flip(2)
                crops.append(crop_t)
            x = torch.stack(crops).float() / 127.5 - 1
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            l1 = (rec - x).abs().mean()
            loss = l1 + 1e-6 * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(l1.item())
        # Like SD3.5's VAE config, the stand-in declares the shift/scale that make its latents zero-mean and
        # unit-std (the diffusion model's noise schedule assumes unit-scale data): measured on the tiles.
        vae.eval()
        with torch.no_grad():
            z = torch.cat([vae.encode(im[None].float() / 127.5 - 1).latent_dist.mean for im in images])
        shift, scale = float(z.mean()), float(1.0 / z.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        vae.save_pretrained(tmp)
        log = {"steps": steps, "l1_first": losses[0], "l1_last": float(np.mean(losses[-10:])),
               "shift_factor": shift, "scaling_factor": scale}  # fmt: skip
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    return log
