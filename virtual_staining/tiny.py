"""Tiny random stand-ins for every part of virtual staining: for tests and the notebook's offline mode only.

The builders are `diffusion.standins`'; this module writes the bundle. They are NOT PixCell weights and produce noise-like images. Each part is built by the project's own code and
written in the same on-disk format as the real one, so everything downstream runs through the real loaders:

    transformer/  PixCell-tiny-128-T16 (16 UNI tokens of 96-d -> 128 px images), diffusers folder
    vae/          16-channel f8 AutoencoderKL (build_tiny_vae)
    uni/          UNI2-h-shaped ViT with 96-d features (build_tiny_uni)
    flow_mlp.safetensors, lora.safetensors   small flow MLP (96-d) and a rank-4 adapter (random, non-zero)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion.model.flow_mlp import FlowMLP, save_flow_mlp
from diffusion.model.lora import add_lora, save_lora_weights
from diffusion.standins import TINY_FLOW, TINY_UNI_DIM, build_tiny_transformer, build_tiny_uni, build_tiny_vae


@dataclass
class TinyParts:
    transformer: Path
    vae: Path
    uni: Path
    flow: Path
    lora: Path


def build_tiny_parts(out_dir: str | Path, seed: int = 0) -> TinyParts:
    """Write all tiny parts under `out_dir` (reused when already there) and return their paths."""
    out = Path(out_dir)
    parts = TinyParts(
        out / "transformer", out / "vae", out / "uni", out / "flow_mlp.safetensors", out / "lora.safetensors"
    )
    if all(p.exists() for p in vars(parts).values()):
        return parts
    out.mkdir(parents=True, exist_ok=True)
    transformer = build_tiny_transformer(seed)
    transformer.save_pretrained(parts.transformer)
    build_tiny_vae(parts.vae, seed=seed)
    build_tiny_uni(parts.uni, embed_dim=TINY_UNI_DIM, seed=seed)
    torch.manual_seed(seed)
    flow = FlowMLP(**TINY_FLOW)
    for p in flow.parameters():  # the zero-initialised heads would make a do-nothing flow
        p.data.normal_(0, 0.02)
    save_flow_mlp(flow, parts.flow)
    add_lora(transformer)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:  # fresh adapters start at zero (B = 0): give the stand-in a visible effect
            p.data.normal_(0, 0.05)
    save_lora_weights(transformer, parts.lora)
    return parts
