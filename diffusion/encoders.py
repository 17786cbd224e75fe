"""The two frozen encoders PixCell is built on: UNI2-h (timm) and the SD3.5 VAE (diffusers).

Real weights are the default path: UNI2-h from `hf-hub:MahmoodLab/UNI2-h` or a local folder/file, the VAE from
`stabilityai/stable-diffusion-3.5-large` (subfolder `vae`) or a local folder. Both are gated on the Hub; when
they cannot be reached the loaders fail with one line saying what to pass instead.

Small stand-ins for tests and the CPU demo only live in `diffusion/standins.py`: built from the same classes,
saved in the same on-disk format and loaded back through these loaders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import (
    UNI_TILE,
    from_model_latents,
    latent_norm,
    to_model_latents,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

UNI2H_HUB_ID = "hf-hub:MahmoodLab/UNI2-h"
SD35_VAE_ID = "stabilityai/stable-diffusion-3.5-large"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The UNI2-h architecture (model card of MahmoodLab/UNI2-h), built through timm.
UNI2H_ARCH = "vit_giant_patch14_224"
UNI2H_KWARGS = dict(
    img_size=224,
    patch_size=14,
    depth=24,
    num_heads=24,
    init_values=1e-5,
    embed_dim=1536,
    mlp_ratio=2.66667 * 2,
    num_classes=0,
    no_embed_class=True,
    mlp_layer="SwiGLUPacked",
    act_layer="SiLU",
    reg_tokens=8,
    dynamic_img_size=True,
)
_LAYERS = {"mlp_layer": ("timm.layers", "SwiGLUPacked"), "act_layer": ("torch.nn", "SiLU")}


def resolve_timm_layers(kwargs: dict) -> dict:
    """timm wants classes for mlp_layer/act_layer; our config files store their names."""
    import importlib

    out = dict(kwargs)
    for key, (module, default) in _LAYERS.items():
        if isinstance(out.get(key), str):
            name = out[key]
            mod = importlib.import_module(module)
            if not hasattr(mod, name):
                raise ValueError(f"{key}={name!r}: not found in {module} (expected e.g. {default!r})")
            out[key] = getattr(mod, name)
    return out


#################################################################################
#                                  UNI2-h                                       #
#################################################################################


class UNIEncoder(torch.nn.Module):
    """A timm ViT plus the preprocessing PixCell used: resize to 224, ImageNet mean/std.

    (timm's pretrained config for this architecture says mean/std 0.5; the published PixCell feature tools
    used ImageNet statistics, so they are fixed here.)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        input_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.model = model.eval()
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.model.num_features

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) float in [0, 1] (or uint8) -> (B, embed_dim)."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        x = F.interpolate(
            images.float(), size=(self.input_size, self.input_size), mode="bilinear", antialias=True
        )
        x = (x - self.mean) / self.std
        param = next(self.model.parameters())
        return self.model(x.to(param.dtype)).float()

    def embed_grid(self, images: Tensor, batch_size: int = 64, tile: int = UNI_TILE) -> Tensor:
        """(B, 3, H, W) images (float in [0, 1] or uint8, any device) with H, W multiples of `tile` -> (B, T, C)
        tokens on the encoder's device, one per tile, row-major; tiles go through the encoder `batch_size` at a
        time (the tiles of many large images need not fit at once)."""
        tiles = tile_images(images, tile)  # (B, T, 3, tile, tile)
        b, t = tiles.shape[:2]
        flat = tiles.flatten(0, 1)
        device = self.mean.device
        feats = [self(flat[i : i + batch_size].to(device)) for i in range(0, len(flat), batch_size)]
        return torch.cat(feats).view(b, t, -1)


def tile_images(images: Tensor, tile: int = UNI_TILE) -> Tensor:
    """(B, C, H, W) -> (B, (H/tile)*(W/tile), C, tile, tile), tiles in row-major order."""
    b, c, h, w = images.shape
    if h % tile or w % tile:
        raise ValueError(
            f"image size {h}x{w}: expected multiples of {tile} px (one UNI token per {tile} px tile)"
        )
    x = images.reshape(b, c, h // tile, tile, w // tile, tile)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // tile) * (w // tile), c, tile, tile)


def load_uni(source: str | Path = UNI2H_HUB_ID, device: str | torch.device = "cpu") -> UNIEncoder:
    """Load UNI2-h (or a timm encoder saved in the same format) as a `UNIEncoder`.

    source: `hf-hub:MahmoodLab/UNI2-h` (needs access and network), a folder with `config.json` (timm format:
    `architecture` + `model_args`) and `pytorch_model.bin`/`model.safetensors`, or a weights file for the UNI2-h
    architecture (`pytorch_model.bin` as downloaded from the Hub).
    """
    import timm

    source = str(source)
    path = Path(source)
    if source.startswith("hf-hub:"):
        try:
            model = timm.create_model(source, pretrained=True, **resolve_timm_layers(UNI2H_KWARGS))
        except Exception as err:
            raise RuntimeError(
                f"cannot load {source} ({type(err).__name__}): request access on the Hub and log in, or pass a "
                "local folder/file as `uni` (e.g. the downloaded pytorch_model.bin)"
            ) from None
        return UNIEncoder(model).to(device)
    if path.is_dir():
        cfg_file = path / "config.json"
        arch, kwargs = UNI2H_ARCH, UNI2H_KWARGS
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            arch, kwargs = cfg.get("architecture", arch), cfg.get("model_args", kwargs)
        weights = next(
            (path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None
        )
        if weights is None:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin inside")
    elif path.is_file():
        arch, kwargs, weights = UNI2H_ARCH, UNI2H_KWARGS, path
    else:
        raise FileNotFoundError(f"UNI encoder {source}: no such file or folder (or use {UNI2H_HUB_ID})")
    model = timm.create_model(arch, pretrained=False, **resolve_timm_layers(kwargs))
    state = _read_weights(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: does not match {arch} (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    return UNIEncoder(model).to(device)


def _read_weights(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None


#################################################################################
#                                SD3.5 VAE                                      #
#################################################################################


def load_vae(
    source: str | Path = SD35_VAE_ID, subfolder: str | None = "vae", torch_dtype: torch.dtype | None = None
) -> AutoencoderKL:
    """Load the SD3.5 VAE (`AutoencoderKL`) from a hub id (subfolder `vae`) or a local folder."""
    from diffusers import AutoencoderKL

    path = Path(source)
    try:
        if path.is_dir():
            folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"VAE folder {path}: no config.json (or vae/config.json) inside")
            return AutoencoderKL.from_pretrained(folder, torch_dtype=torch_dtype).eval()
        if path.exists() or str(source).startswith((".", "/")):
            raise FileNotFoundError(f"VAE {source}: expected a diffusers folder or a hub id")
        return AutoencoderKL.from_pretrained(str(source), subfolder=subfolder, torch_dtype=torch_dtype).eval()
    except (OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise RuntimeError(
            f"cannot load the VAE from {source} ({type(err).__name__}): accept the SD3.5 licence on the Hub and "
            "log in, or pass a local folder as `vae`"
        ) from None


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latents_to_model(z: Tensor, vae: AutoencoderKL) -> Tensor:
    """Raw VAE latents -> model space, with the normalisation in the VAE's config (diffusion.geometry)."""
    return to_model_latents(z, *latent_norm(vae))


def latents_from_model(x: Tensor, vae: AutoencoderKL) -> Tensor:
    return from_model_latents(x, *latent_norm(vae))


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Model-space latents (B, 16, h, w) -> images (B, 3, 8h, 8w) in [0, 1], float32."""
    param = next(vae.parameters())
    z = latents_from_model(latents.float(), vae).to(param.dtype)
    images = vae.decode(z).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, images: Tensor) -> tuple[Tensor, Tensor]:
    """Images (B, 3, H, W) in [0, 1] -> VAE posterior (mean, std), each (B, 16, H/8, W/8), raw VAE space."""
    param = next(vae.parameters())
    dist = vae.encode((images * 2 - 1).to(param.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
