"""Tiny random stand-ins for the real components: for tests, benchmarks and the CPU demo only, never the product path.

Each builds the real class (timm ViT, diffusers AutoencoderKL, PixCell transformer, TorchScript Inception) at a
toy size with random weights and writes it in the real on-disk format, so that everything downstream runs through
the product's own loaders (`load_uni`, `load_vae`, `load_feature_encoder`, `load_inception`). Their outputs mean
nothing: a test that uses them checks plumbing, shapes and invariants, not image quality.

    build_tiny_uni            UNI2-h-shaped timm ViT (SwiGLU, registers), 96-d features, saved like UNI2-h
    build_tiny_vae            16-channel f8 AutoencoderKL with SD3.5's shift/scale, a diffusers folder
    build_micro_vae, build_tiny_t16, save_wsi_models   the smallest VAE and a 16-token model, for whole slides
    build_tiny_timm_encoder   a 1-block timm ViT in the Hub's timm layout (stands in for H-optimus-0, Virchow2)
    build_tiny_inception      a TorchScript net with the interface of clean-fid's inception-2015-12-05.pt
    build_tiny_transformer    PixCell-tiny-128-T16 for the tiny UNI (96-d), non-zero random weights
    TINY_FLOW                 the virtual-staining flow MLP's tiny size (stated in its tiny config, read here)
    reference_eps_fn          the one-window-at-a-time sliding-window loop of the published 4K script

The demo's trained stand-ins (a VAE and a UNI that reconstruct and follow tissue) start from these builders:
`diffusion/demo/standins.py`. The virtual-staining bundle (transformer, VAE, UNI, flow MLP, LoRA on disk) is
`virtual_staining/tiny.py`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .atomic import atomic_path
from .config import shipped_config
from .encoders import UNI2H_ARCH, UNI2H_KWARGS, resolve_timm_layers
from .geometry import SD35_LATENT_SCALE, SD35_LATENT_SHIFT
from .metrics.inception import INCEPTION_DIM, INCEPTION_FILE
from .model.pixcell_transformer import build_pixcell
from .sampling.large_image import WindowLayout
from .sampling.samplers import guided_prediction

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

TINY_PRESET = "PixCell-tiny-128-T16"  # 16 UNI tokens -> 128 px images
TINY_UNI_DIM = 96  # build_tiny_uni's feature size (int(96 * 5.33334) is even, as SwiGLUPacked needs)
_TINY_FLOW_CONFIG = shipped_config("virtual_staining/tiny_flow_mlp.py")


def _read_tiny_flow() -> dict:
    from mmengine.config import Config

    return dict(Config.fromfile(str(_TINY_FLOW_CONFIG)).flow)


TINY_FLOW: dict = _read_tiny_flow()  # FlowMLP(**TINY_FLOW): the one definition is the tiny config's `flow`


#################################################################################
#                                 Encoders                                      #
#################################################################################


def build_tiny_uni(
    out_dir: str | Path,
    embed_dim: int = 96,
    depth: int = 2,
    seed: int = 0,
    init_values: float | None = 1e-5,
) -> Path:
    """A UNI2-h-shaped stand-in (same timm architecture family, SwiGLU, registers), saved like UNI2-h.

    For tests and the CPU demo only. int(embed_dim * 5.33334) must be even for SwiGLUPacked (96 works).
    With UNI2-h's layer scale (init_values 1e-5) a random model's features are ~1e-4 and nearly constant;
    init_values=None gives random features that differ between images (the demo's stand-in).
    """
    import timm

    kwargs = {**UNI2H_KWARGS, "embed_dim": embed_dim, "depth": depth, "num_heads": max(1, embed_dim // 48)}
    kwargs["init_values"] = init_values
    torch.manual_seed(seed)
    model = timm.create_model(UNI2H_ARCH, pretrained=False, **resolve_timm_layers(kwargs))
    cfg = {
        "architecture": UNI2H_ARCH,
        "model_args": kwargs,
        "note": "tiny random stand-in for UNI2-h (tests/demo)",
    }
    return save_timm_folder(model, out_dir, cfg)


def save_timm_folder(model: torch.nn.Module, out_dir: str | Path, config: dict) -> Path:
    """A timm model in the Hub's timm layout (model.safetensors + config.json), as `load_uni` and the metrics'
    `load_feature_encoder` read it back; for the tiny stand-ins of tests and the demo."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def build_tiny_vae(
    out_dir: str | Path,
    seed: int = 0,
    block_out_channels: Sequence[int] = (32, 32, 64, 64),
    mid_attention: bool = True,
):
    """A 16-channel, f8 `AutoencoderKL` with SD3.5's shift/scale; for tests and the CPU demo only.

    mid_attention=False makes it fully convolutional, so it can be trained on small crops and used on
    whole tiles (the demo's stand-in)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=16,
        sample_size=256,
        scaling_factor=SD35_LATENT_SCALE,
        shift_factor=SD35_LATENT_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=mid_attention,
    )
    vae.save_pretrained(out_dir)
    return vae.eval()


#################################################################################
#                               PixCell transformer                             #
#################################################################################


def random_pixcell(preset: str, seed: int = 0, scale: float = 0.05, **overrides):
    """A PixCell `preset` (+ config `overrides`) with N(0, scale) weights: the default init zeroes the output
    head, so a fresh model's output would not depend on its condition."""
    torch.manual_seed(seed)
    model = build_pixcell(preset, **overrides)
    for p in model.parameters():
        p.data.normal_(0, scale)
    return model.eval()


def build_tiny_transformer(seed: int = 0, scale: float = 0.05):
    """PixCell-tiny-128-T16 for the tiny UNI, with non-zero random weights (so outputs depend on the condition)."""
    return random_pixcell(TINY_PRESET, seed, scale, caption_channels=TINY_UNI_DIM)


#################################################################################
#                                   Metrics                                     #
#################################################################################


def build_tiny_timm_encoder(
    out_dir: str | Path,
    arch: str = "vit_tiny_patch16_224",
    model_args: Mapping | None = None,
    input_size: int = 32,
    mean: tuple[float, float, float] = (0.70, 0.58, 0.70),
    std: tuple[float, float, float] = (0.21, 0.23, 0.18),
    seed: int = 0,
) -> Path:
    """A tiny random timm encoder saved in the Hub's timm layout (config.json + model.safetensors).

    For tests and the CPU demo only: it stands in for H-optimus-0 / Virchow2-style encoders and is loaded
    back through `load_feature_encoder` exactly like a downloaded one. The default is a 1-block ViT with a
    class token and 2 registers that returns tokens (global_pool=''), so it needs a `pool=` option.
    """
    import timm

    args = dict(
        img_size=input_size,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=0,
        reg_tokens=2,
        global_pool="",
    )
    args.update(model_args or {})
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **args)
    cfg = {
        "architecture": arch,
        "model_args": args,
        "pretrained_cfg": {"input_size": [3, input_size, input_size], "mean": list(mean), "std": list(std)},
        "note": "tiny random stand-in encoder (tests/demo only)",
    }
    return save_timm_folder(model, out_dir, cfg)


class _TinyInceptionLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.fc = torch.nn.Linear(8, INCEPTION_DIM)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))  # (B, 8)
        return self.fc(h)[:, :, None, None]  # (B, 2048, 1, 1), the real network's pool3 shape


class _TinyInception(torch.nn.Module):
    """Same TorchScript interface as inception-2015-12-05.pt: `.layers(x)` and `forward(x, return_features)`."""

    def __init__(self):
        super().__init__()
        self.layers = _TinyInceptionLayers()

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        return self.layers(x)


def build_tiny_inception(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random TorchScript network saved as `<out_dir>/inception-2015-12-05.pt` (tests/demo only).

    Loaded through `load_inception` and clean-fid's InceptionV3W like the real file; its "FID" means nothing.
    """
    torch.manual_seed(seed)
    out = Path(out_dir) / INCEPTION_FILE
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # jit.script is deprecated, but the format is TorchScript
        torch.jit.script(_TinyInception().eval()).save(str(tmp))
    return out


#################################################################################
#                        Large images: the one-window reference                 #
#################################################################################


def reference_eps_fn(
    model_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    layout: WindowLayout,
    grid: Tensor,  # (Gh, Gw, C) region token grid
    uncond: Tensor | None,  # (T, C)
    guidance_scale: float,
    guidance_interval: tuple[float, float] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The one-window-at-a-time reference (the published script's loop): for tests and benchmarks only.

    Each window is cut, its sub-grid sliced straight from the grid, and the model run once for the conditional
    and once for the unconditional input (batch 1 each); the guidance itself is `guided_prediction`'s.
    """
    m, tile, w = layout.tokens_side, layout.tile, layout.window

    def single(x: Tensor, cond: Tensor, t: Tensor) -> Tensor:  # one forward per row (cond, then uncond)
        return torch.cat([model_fn(x[i : i + 1], cond[i : i + 1], t[i : i + 1]) for i in range(x.shape[0])])

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        total = None
        count = torch.zeros(1, 1, layout.height, layout.width, device=x.device)
        for y in range(0, layout.height - w + 1, layout.stride):
            for u in range(0, layout.width - w + 1, layout.stride):
                c = grid[y // tile : y // tile + m, u // tile : u // tile + m].reshape(1, m * m, -1)
                unc = uncond.unsqueeze(0) if uncond is not None else None
                out = guided_prediction(
                    single, x[:, :, y : y + w, u : u + w], t, c, unc, guidance_scale, guidance_interval
                )
                if total is None:
                    total = torch.zeros(1, out.shape[1], layout.height, layout.width, device=x.device)
                total[:, :, y : y + w, u : u + w] += out
                count[:, :, y : y + w, u : u + w] += 1
        return total / count

    return eps_fn


def build_micro_vae(seed: int = 0) -> AutoencoderKL:
    """The smallest f8, 16-channel `AutoencoderKL` (2 channels per block, no mid attention, SD3.5's shift/scale):
    a whole slide decodes in seconds on one CPU thread. For the whole-slide tests and benchmark only."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(2, 2, 2, 2),
        layers_per_block=0,
        latent_channels=16,
        norm_num_groups=1,
        scaling_factor=SD35_LATENT_SCALE,
        shift_factor=SD35_LATENT_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()


def build_tiny_t16(channels: int = 96, seed: int = 0) -> torch.nn.Module:
    """A tiny 1024-style PixCell (4 x 4 UNI tokens of `channels` per 128 px window, 32 px per token), weights
    drawn N(0, 0.02) so that its output is not zero. For the whole-slide tests and benchmark only."""
    torch.manual_seed(seed)
    model = build_pixcell("PixCell-tiny-128-T16", caption_channels=channels).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model


def save_wsi_models(root: str | Path, channels: int = 96) -> tuple[Path, Path]:
    """`build_tiny_t16` and `build_micro_vae` saved as the tools load them -> (model folder, VAE folder)."""
    root = Path(root)
    build_tiny_t16(channels).save_pretrained(root / "model")
    build_micro_vae().save_pretrained(root / "vae")
    return root / "model", root / "vae"
