"""Stand-ins for the two gated encoders, for the CPU demo only (never used by the product's default path).

- VAE stand-in: a small 16-channel, f8 `AutoencoderKL` (the SD3.5 VAE's latent shape and shift/scale; no
  attention, so fully convolutional), trained for a few minutes on random 96 px crops (any offset, flips and
  90-degree rotations) of the demo's training tiles, with an L1 and an edge loss, so that its reconstructions
  keep the nuclei and the eosin of the tiles.
- UNI2-h stand-in: a small ViT of the UNI2-h architecture family (96-d features), trained for a minute or two by
  contrastive learning on crops of the same tiles, so that its features follow tissue content.

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
from diffusion.standins import build_tiny_uni, build_tiny_vae

VAE_CHANNELS = (32, 32, 64, 64)


def dihedral(image: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/90-degree rotations of a (..., H, W) image: k in 0..7 (k >= 4: transposed first)."""
    if k >= 4:
        image = image.transpose(-1, -2)
    return torch.rot90(image, k % 4, dims=(-2, -1))


def sobel(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C, H-2, W-2): horizontal and vertical Sobel gradients of every channel."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device) / 8
    kernels = torch.stack([kx, kx.T])[:, None].repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    return torch.nn.functional.conv2d(x, kernels.to(x.dtype), groups=x.shape[1])


def _read_tiles(tiles: Sequence[str | Path]) -> list[torch.Tensor]:
    if not tiles:
        raise ValueError("no training tiles for the demo stand-ins")
    return [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in tiles]


def train_uni_standin(
    tiles: Sequence[str | Path],
    out_dir: str | Path,
    steps: int = 150,
    batch: int = 32,
    view_size: int = 112,
    temperature: float = 0.2,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """A UNI2-h-shaped ViT (96-d) trained briefly by contrastive learning (SimCLR, Chen et al. 2020) on the tiles.

    Two random crops (96-256 px, flips, a mild stain jitter) of one tile are a positive pair; the other crops of
    the batch are negatives (NT-Xent loss on a small projection head, dropped afterwards). A random ViT's
    features mostly measure texture energy; a couple of minutes of this make the stand-in's feature space
    follow tissue content, which is what the demo conditions on and evaluates in. Saved like UNI2-h
    (config.json + model.safetensors, atomic) with `train_log.json`; returns the log.
    """
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from diffusion.encoders import load_uni

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "train_log.json").is_file():
        return json.loads((out / "train_log.json").read_text())
    images = [t.float() / 255 for t in _read_tiles(tiles)]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    with atomic_path(out) as tmp:
        build_tiny_uni(tmp, seed=seed, init_values=None)
        encoder = load_uni(tmp)  # the real loader, so the trained weights load back the same way
        vit = encoder.model.train()
        head = torch.nn.Sequential(
            torch.nn.Linear(vit.num_features, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)
        )
        opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=lr, weight_decay=0.05)

        def view(img: torch.Tensor) -> torch.Tensor:
            side = rng.randint(96, img.shape[1])
            y, x = rng.randint(0, img.shape[1] - side), rng.randint(0, img.shape[2] - side)
            crop = img[:, y : y + side, x : x + side]
            crop = crop.flip(2) if rng.random() < 0.5 else crop
            crop = crop.flip(1) if rng.random() < 0.5 else crop
            crop = crop * (1 + 0.1 * (torch.rand(3, 1, 1) - 0.5))  # mild stain variation
            return F.interpolate(crop[None], size=view_size, mode="bilinear", antialias=True)[0].clamp(0, 1)

        losses = []
        for _ in tqdm(range(steps), desc="UNI stand-in", leave=False):
            picks = [rng.choice(images) for _ in range(batch)]
            views = torch.stack([view(i) for i in picks] + [view(i) for i in picks])
            z = F.normalize(head(vit((views - encoder.mean) / encoder.std)), dim=1)
            sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
            target = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
            loss = F.cross_entropy(sim, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp / "model.safetensors")
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["note"] = "UNI2-h stand-in for the CPU demo: tiny ViT, contrastive training on the demo's tiles"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        log = {"steps": steps, "nt_xent_first": losses[0], "nt_xent_last": float(np.mean(losses[-10:]))}
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def train_vae_standin(
    tiles: Sequence[str | Path],
    out_dir: str | Path,
    steps: int = 600,
    crop: int = 96,
    batch: int = 8,
    lr: float = 2e-3,
    edge_weight: float = 1.0,
    seed: int = 0,
) -> dict:
    """Train the small AutoencoderKL on random crops of `tiles` (L1 + edge L1 + a tiny KL, as a VAE warm start).

    Why not smaller crops and L1 alone (the first version: 32 px crops, batch 16, 400 steps): its reconstructions
    of the demo tiles kept a quarter of the nuclei and turned eosin mauve (issue 29). A 32 px crop is 4x4 latent
    px, smaller than the decoder's receptive field and the GroupNorm statistics it sees at 256 px, and L1
    is content with the local mean colour, which is a blur. 96 px crops (more context per step at the same
    pixel count as 32 px x 16 x 4.5), crops at any offset with the 8 flips/rotations (tissue has no orientation),
    and an L1 on Sobel gradients (`edge_weight`: sharp nuclear borders cost as much as their colour) fix both.

    The model is saved as a diffusers folder (`save_pretrained`, atomic) with `train_log.json` beside it.
    Returns {"steps", "l1_first", "l1_last", "shift_factor", "scaling_factor"}.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "train_log.json").is_file():
        return json.loads((out / "train_log.json").read_text())
    images = _read_tiles(tiles)
    rng = random.Random(seed)
    torch.manual_seed(seed)
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
                crops.append(dihedral(img[:, y : y + crop, x : x + crop], rng.randrange(8)))
            x = torch.stack(crops).float() / 127.5 - 1
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            l1 = (rec - x).abs().mean()
            edge = (sobel(rec) - sobel(x)).abs().mean()
            loss = l1 + edge_weight * edge + 1e-6 * post.kl().mean()
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
        log = {
            "steps": steps,
            "crop": crop,
            "batch": batch,
            "edge_weight": edge_weight,
            "l1_first": losses[0],
            "l1_last": float(np.mean(losses[-10:])),
            "shift_factor": shift,
            "scaling_factor": scale,
        }
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    return log
