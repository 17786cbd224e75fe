"""H&E -> IHC: UNI2-h tokens of the H&E image, flow-translated to IHC tokens, sampled by PixCell-1024 + LoRA.

    stainer = VirtualStainer.from_sources(model="StonyBrook-CVLab/PixCell-1024", lora=..., flow=..., device="cuda")
    ihc = stainer(he_images, seeds=[0, 1])          # (B, 3, H, W) in [0, 1] -> (B, 3, H', W') in [0, 1]

The staining unit is the model's image: 16 UNI tokens = a 1024 x 1024 px H&E image (4 x 4 tiles of 256 px). A
larger image whose sides are multiples of 1024 is cut into such units, each stained on its own (its own noise),
and the outputs are stitched back in place. Each unit comes out at the model's resolution (1024 px for
PixCell-1024: same size as the input; the tiny test models give smaller images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffusion.encoders import UNIEncoder, load_uni, load_vae
from diffusion.geometry import UNI_TILE
from diffusion.model.flow_mlp import FlowMLP, load_flow_mlp, rescale_norm
from diffusion.model.loading import load_transformer
from diffusion.model.lora import add_lora, load_lora_weights, lora_parameters, read_lora_file
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.samplers import make_scheduler

from .published import resolve_weights


@dataclass
class SamplerSettings:
    """Diffusion sampler settings; defaults: the published PixCell-1024 ones (DPM-Solver++ 20 steps, w = 1.2)."""

    sampler: str = "dpm-solver"
    num_inference_steps: int | None = None  # None: the sampler's default (20 for DPM-Solver++)
    guidance_scale: float | None = None  # None: 1.2 for 16-token models
    flow_steps: int = 100  # Euler steps of the embedding flow
    flow_grid: str = (
        "uniform"  # its time grid: "uniform" t_i = i / steps, or "clipped" (see FlowMLP.translate)
    )
    rescale_norm: bool = (
        False  # IHC tokens rescaled to the H&E tokens' mean norm, per image (uncertain upstream)
    )


class VirtualStainer:
    """UNI encoder + flow MLP (None: no translation, H&E tokens condition directly) + PixCell pipeline."""

    def __init__(
        self,
        uni: UNIEncoder,
        flow: FlowMLP | None,
        pipe: PixCellPipeline,
        settings: SamplerSettings | None = None,
    ):
        self.uni, self.flow, self.pipe = uni, flow, pipe
        self.settings = settings or SamplerSettings()
        tokens = pipe.transformer.config.caption_num_tokens
        self.side = math.isqrt(tokens)  # tiles per side of a staining unit
        if self.side**2 != tokens:
            raise ValueError(f"the transformer takes {tokens} UNI tokens: not a square grid")
        dim = pipe.transformer.config.caption_channels
        if uni.embed_dim != dim:
            raise ValueError(
                f"UNI encoder gives {uni.embed_dim}-d tokens but the transformer expects {dim}-d"
            )
        if flow is not None and flow.embed_dim != dim:
            raise ValueError(
                f"flow MLP works on {flow.embed_dim}-d tokens but the transformer expects {dim}-d"
            )
        self.pipe.set_sampler(self.settings.sampler)

    @classmethod
    def from_sources(
        cls,
        model: str | Path,
        lora: str | Path | None,
        flow: str | Path | None,
        vae: str | Path | torch.nn.Module,
        uni: str | Path | UNIEncoder,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        settings: SamplerSettings | None = None,
    ) -> VirtualStainer:
        """Load every part: PixCell transformer (+ LoRA when given), VAE, UNI, flow MLP (when given).

        lora / flow: local files or hub references `OWNER/REPO:PATH` (see `virtual_staining.published`).
        vae / uni: sources, or models already loaded (the app shares one VAE and one UNI2-h between stains).
        """
        cast = None if dtype == torch.float32 else dtype  # the loaders' default is fp32 already
        transformer = load_transformer(model, torch_dtype=cast)
        if lora is not None:
            lora_file = resolve_weights(lora, "LoRA weights")
            state, lora_settings = read_lora_file(lora_file)
            add_lora(transformer, lora_settings)
            load_lora_weights(transformer, lora_file, state)
            for p in lora_parameters(transformer):  # peft creates the adapter in fp32
                p.data = p.data.to(dtype)
        # The flow stays in fp32: 100 small Euler steps would accumulate bf16 rounding.
        flow_model = load_flow_mlp(resolve_weights(flow, "flow MLP"), device) if flow is not None else None
        pipe = PixCellPipeline(
            transformer=transformer.eval(),
            vae=vae if isinstance(vae, torch.nn.Module) else load_vae(vae, torch_dtype=cast),
            scheduler=make_scheduler("dpm-solver"),
        ).to(device)
        if isinstance(uni, UNIEncoder):
            return cls(uni, flow_model, pipe, settings)
        uni_model = load_uni(uni, device=device)
        if cast is not None:
            uni_model = uni_model.to(cast)
        return cls(uni_model, flow_model, pipe, settings)

    # ------------------------------------------------------------------ geometry

    @property
    def unit_size(self) -> int:
        """Side in px of the H&E image one model sample covers (1024 for PixCell-1024)."""
        return self.side * UNI_TILE

    @property
    def output_unit_size(self) -> int:
        """Side in px of one generated unit (the model's image size)."""
        return self.pipe.image_size

    def check_image(self, images: Tensor, name: str = "images") -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name}: expected (B, 3, H, W) RGB images, got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.unit_size or w % self.unit_size:
            raise ValueError(
                f"{name}: {w}x{h} px; expected sides that are multiples of {self.unit_size} px "
                f"({self.side}x{self.side} UNI tiles of {UNI_TILE} px per model sample)"
            )

    # ------------------------------------------------------------------ the three steps

    def embed(self, units: Tensor) -> Tensor:
        """H&E units (N, 3, U, U) in [0, 1] -> UNI tokens (N, T, C)."""
        device = next(self.uni.parameters()).device
        return self.uni.embed_grid(units.to(device)).float()

    def translate(self, he_tokens: Tensor) -> Tensor:
        """H&E tokens (N, T, C) -> IHC tokens (N, T, C) by the flow MLP (identity without one)."""
        if self.flow is None:
            return he_tokens
        s = self.settings
        ihc = self.flow.translate(he_tokens.float(), steps=s.flow_steps, grid=s.flow_grid)
        return rescale_norm(ihc, he_tokens) if s.rescale_norm else ihc

    def generate(self, ihc_tokens: Tensor, latents: Tensor, progress: bool = False) -> Tensor:
        """IHC tokens (N, T, C) + initial noise (N, 16, h, w) -> IHC images (N, 3, S, S) in [0, 1]."""
        s = self.settings
        return self.pipe(
            ihc_tokens,
            guidance_scale=s.guidance_scale,
            num_inference_steps=s.num_inference_steps,
            latents=latents,
            output_type="pt",
            progress=progress,
        ).images

    # ------------------------------------------------------------------ whole images

    def initial_noise(self, seed: int, count: int) -> Tensor:
        """The (count, 16, h, w) starting noise of an image's units: from `seed` alone, batch-independent."""
        cfg = self.pipe.transformer.config
        g = torch.Generator().manual_seed(seed)
        return torch.randn(count, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)

    @torch.no_grad()
    def __call__(
        self,
        images: Tensor,
        seeds: list[int] | None = None,
        max_units: int | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Stain H&E images (B, 3, H, W) in [0, 1], H and W multiples of the unit size -> (B, 3, H', W').

        seeds: one per image (default 0..B-1); an image's output depends only on it and its seed.
        max_units: most model samples per forward pass (memory bound for large images). Every unit's noise is
        fixed by its image's seed, so results depend on it only through float summation order (~1e-6).
        """
        self.check_image(images)
        b, _, h, w = images.shape
        seeds = list(range(b)) if seeds is None else list(seeds)
        if len(seeds) != b:
            raise ValueError(f"seeds: expected {b} (one per image), got {len(seeds)}")
        u, rows, cols = self.unit_size, h // self.unit_size, w // self.unit_size
        units = images.reshape(b, 3, rows, u, cols, u).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, u, u)
        latents = torch.cat([self.initial_noise(s, rows * cols) for s in seeds])
        chunk = max_units or len(units)
        out = torch.cat(
            [
                self.generate(
                    self.translate(self.embed(units[i : i + chunk])), latents[i : i + chunk], progress
                )
                .float()
                .cpu()
                for i in range(0, len(units), chunk)
            ]
        )  # (B*rows*cols, 3, o, o)
        o = out.shape[-1]
        return out.reshape(b, rows, cols, 3, o, o).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, rows * o, cols * o)
