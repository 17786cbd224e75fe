"""PixCellPipeline: UNI2-h embeddings in, H&E images out (a diffusers `DiffusionPipeline`).

    pipe = PixCellPipeline.from_pretrained("StonyBrook-CVLab/PixCell-256")   # VAE: SD3.5 (gated) by default
    images = pipe(uni_embeds, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images

The number of UNI tokens fixes the image: T = 1 -> 256 px, 16 -> 1024 px (the transformer's trained size,
`sample_size * 8`); a condition with another T or dim, or with NaNs, is a one-line ValueError.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor

from ..encoders import SD35_VAE_ID, decode_latents, load_vae, to_uint8, vae_scale_factor
from ..model.loading import load_transformer
from ..model.pixcell_transformer import PixCellTransformer2DModel
from .samplers import (
    denoise,
    guided_prediction,
    guides,
    make_scheduler,
    resolve_defaults,
    sampler_name,
    transformer_fn,
)


class PixCellPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: PixCellTransformer2DModel, vae, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_parts(
        cls,
        transformer: str | Path | PixCellTransformer2DModel,
        vae: str | Path | object = SD35_VAE_ID,
        sampler: str = "dpm-solver",
        torch_dtype: torch.dtype | None = None,
    ) -> PixCellPipeline:
        """Assemble from a transformer (hub id, diffusers folder, original checkpoint, or model) and a VAE."""
        if not isinstance(transformer, torch.nn.Module):
            transformer = load_transformer(transformer, torch_dtype=torch_dtype)
        if not isinstance(vae, torch.nn.Module):
            vae = load_vae(vae, torch_dtype=torch_dtype)
        return cls(transformer=transformer, vae=vae, scheduler=make_scheduler(sampler))

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        vae: str | Path | None = None,
        sampler: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **_: object,
    ) -> PixCellPipeline:
        """Load a pipeline folder (model_index.json + transformer/ + vae/ + scheduler/), or a transformer source.

        The published PixCell repos hold only the transformer; the VAE then defaults to SD3.5's (`vae` overrides).
        A saved scheduler is kept unless `sampler` names another one.
        """
        path = Path(source)
        if not (path.is_dir() and (path / "model_index.json").is_file()):
            return cls.from_parts(source, vae or SD35_VAE_ID, sampler or "dpm-solver", torch_dtype)
        if vae is None:
            vae = path / "vae" if (path / "vae" / "config.json").is_file() else SD35_VAE_ID
        pipe = cls.from_parts(path / "transformer", vae, sampler or "dpm-solver", torch_dtype)
        saved = path / "scheduler" / "scheduler_config.json"
        if sampler is None and saved.is_file():
            cfg = json.loads(saved.read_text())
            try:
                name = sampler_name(cfg.get("_class_name", ""))
            except ValueError as err:
                raise ValueError(f"{saved}: {err}") from None
            pipe.scheduler = type(make_scheduler(name)).from_config(cfg)
        return pipe

    def set_sampler(self, name: str) -> None:
        """Switch sampler: 'dpm-solver' (default), 'ddim', 'sa-solver', 'ddpm' (ancestral, learned variance)."""
        self.scheduler = make_scheduler(name)

    # ------------------------------------------------------------------ sampling

    def model_fn(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """The (x, cond, t) -> (B, 32, h, w) callable the sampler guides; the ControlNet pipeline extends it."""
        return transformer_fn(self.transformer)

    @property
    def image_size(self) -> int:
        return self.transformer.config.sample_size * vae_scale_factor(self.vae)

    def prepare_condition(self, uni_embeds: Tensor | np.ndarray) -> Tensor:
        uni = torch.as_tensor(uni_embeds, dtype=torch.float32)
        if uni.ndim == 2:  # a single image's tokens
            uni = uni.unsqueeze(0)
        self.transformer.check_condition(uni)
        return uni

    @torch.no_grad()
    def __call__(
        self,
        uni_embeds: Tensor | np.ndarray,  # (B, T, C_uni)
        guidance_scale: float | None = None,  # None: 2.0 at T=1, 1.2 at T=16 (published)
        num_inference_steps: int | None = None,  # None: 20 for DPM-Solver++
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,  # (B, 16, h, w) initial noise, for exact seeding
        negative_uni_embeds: Tensor | None = None,  # unconditional input; default: the model's null condition
        guidance_interval: tuple[float, float] | None = None,  # guide only for timesteps in [low, high]
        allow_negative_guidance: bool = False,  # a guidance_scale < 0 is an error unless this says it is meant
        output_type: str = "pil",  # 'pil' | 'np' | 'pt' | 'latent'
        return_dict: bool = True,
        progress: bool = True,
    ) -> ImagePipelineOutput | tuple:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")
        device = self._execution_device
        uni = self.prepare_condition(uni_embeds).to(device)
        batch, tokens = uni.shape[:2]
        steps, w = resolve_defaults(
            sampler_name(self.scheduler), num_inference_steps, guidance_scale, tokens, allow_negative_guidance
        )

        size = self.transformer.config.sample_size
        shape = (batch, self.transformer.config.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        uncond = None
        if guides(w):
            uncond = (
                self.transformer.null_condition(batch) if negative_uni_embeds is None else negative_uni_embeds
            )
            uncond = self.prepare_condition(uncond).to(device)

        fn = self.model_fn()
        x = denoise(
            lambda x, t: guided_prediction(fn, x, t, uni, uncond, w, guidance_interval),
            latents.to(device),
            self.scheduler,
            steps,
            generator=generator,
            progress=progress,
        )
        if output_type == "latent":
            images = x
        else:
            images = decode_latents(self.vae, x)  # (B, 3, H, W) in [0, 1]
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                images = [Image.fromarray(a) for a in to_uint8(images)]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
