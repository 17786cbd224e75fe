"""PixCellControlNetPipeline: a UNI2-h embedding sets the style, a cell mask sets the layout.

    pipe = PixCellControlNetPipeline.from_pretrained("StonyBrook-CVLab/PixCell-256-Cell-ControlNet")
    images = pipe(uni_embeds, mask="masks/patch_0.png", controlnet_conditioning_scale=1.0).images

Everything else (samplers, guidance, seeding, output types) is `PixCellPipeline`'s: this class only renders the
mask, encodes it with the VAE and hands the sampler a model function in which the ControlNet's residuals are
added to the base transformer. With classifier-free guidance both passes (UNI and null condition) see the mask.

The Hub ControlNet pipeline's callers pass the mask as `controlnet_input=`, an H x W x 3 uint8 RGB array (or PIL
image) that the pipeline divides by 255 itself (`../shared/formats/hub_api.md`); that works here too, beside
`mask=` (paths, label images, binary arrays: rendered by `diffusion.data.mask_pairs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, SchedulerMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import Tensor

from ..data.mask_pairs import MaskLike, masks_to_tensor
from ..encoders import SD35_VAE_ID, encode_posterior, latents_to_model, load_vae
from ..model.controlnet import PixCellControlNet, controlled_forward, load_controlnet
from ..model.loading import load_transformer
from ..model.pixcell_transformer import PixCellTransformer2DModel
from .hub import check_pipeline_class, register_with_diffusers, resolve_snapshot, vae_folder
from .pipeline import PixCellPipeline
from .samplers import make_scheduler


class PixCellControlNetPipeline(PixCellPipeline):
    model_cpu_offload_seq = "controlnet->transformer->vae"

    def __init__(
        self,
        transformer: PixCellTransformer2DModel,
        controlnet: PixCellControlNet,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
    ):
        super(PixCellPipeline, self).__init__()
        self.register_modules(transformer=transformer, controlnet=controlnet, vae=vae, scheduler=scheduler)
        self._control: tuple[Tensor, float] | None = None
        self.defaults: dict = {}  # no recorded sampling defaults: the published ones

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_parts(
        cls,
        transformer: str | Path | PixCellTransformer2DModel,
        controlnet: str | Path | PixCellControlNet | None = None,
        vae: str | Path | object = SD35_VAE_ID,
        sampler: str | None = "dpm-solver",
        torch_dtype: torch.dtype | None = None,
    ) -> PixCellControlNetPipeline:
        """Assemble from a base transformer source, a ControlNet source (or model) and a VAE."""
        if controlnet is None:
            raise ValueError(
                "controlnet: required (a hub id, a folder with config.json, or a PixCellControlNet)"
            )
        if not isinstance(transformer, torch.nn.Module):
            transformer = load_transformer(transformer, torch_dtype=torch_dtype)
        if not isinstance(controlnet, torch.nn.Module):
            controlnet = load_controlnet(controlnet, torch_dtype=torch_dtype)
        if not isinstance(vae, torch.nn.Module):
            vae = load_vae(vae, torch_dtype=torch_dtype)
        check_pair(transformer, controlnet)
        return cls(
            transformer=transformer,
            controlnet=controlnet,
            vae=vae,
            scheduler=make_scheduler(sampler or "dpm-solver"),
        )

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        vae: str | Path | torch.nn.Module | None = None,
        sampler: str | None = None,
        torch_dtype: torch.dtype | None = None,
        transformer: str | Path | None = None,
        **hub_kwargs: object,  # custom_pipeline, trust_remote_code, ...: accepted, never needed
    ) -> PixCellControlNetPipeline:
        """A published-layout snapshot (hub id or folder: controlnet/ + transformer/ (+ vae/, scheduler/)), or a
        ControlNet folder with `transformer` naming the base. Nothing in the snapshot is executed; its scheduler
        config is used (logged; `sampler` overrides). The VAE: `vae`, else the snapshot's vae/, else SD3.5's.
        """
        folder = resolve_snapshot(source, with_vae=vae is None)
        if folder is not None:
            check_pipeline_class(
                folder, cls.__name__, {"PixCellPipeline": "diffusion.sampling.pipeline.PixCellPipeline"}
            )
        where = folder or Path(source)
        base = transformer if transformer is not None else (folder or source)
        pipe = cls.from_parts(
            base,
            folder or source,
            vae or vae_folder(where) or SD35_VAE_ID,
            sampler or "dpm-solver",
            torch_dtype,
        )
        if folder is not None:
            pipe.use_saved_scheduler(folder, sampler)
        return pipe

    # ------------------------------------------------------------------ sampling

    def encode_masks(self, mask: MaskLike | Sequence[MaskLike]) -> Tensor:
        """Masks -> model-space VAE latents (B, 16, h, w), the published conditioning (posterior mean)."""
        rendered = masks_to_tensor(mask, self.image_size).to(self._execution_device)  # (B, 3, H, W) in {0, 1}
        mean, _ = encode_posterior(self.vae, rendered)
        return latents_to_model(mean, self.vae)

    def model_fn(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        if self._control is None:
            raise RuntimeError("PixCellControlNetPipeline: call the pipeline with a mask")
        mask_latents, scale = self._control
        dtype = next(self.transformer.parameters()).dtype

        def fn(x: Tensor, cond: Tensor, t: Tensor) -> Tensor:
            # Guidance batches [conditional, unconditional]: the mask goes with both halves.
            m = mask_latents.repeat(x.shape[0] // mask_latents.shape[0], 1, 1, 1)
            out = controlled_forward(
                self.transformer, self.controlnet, x.to(dtype), m.to(dtype), cond.to(dtype), t, scale
            )
            return out.float()

        return fn

    def encode_controlnet_input(self, images: object) -> Tensor:
        """The Hub call's `controlnet_input`: H x W x 3 uint8 RGB (array, PIL image, a list of them, or a
        (B, H, W, 3) array), divided by 255 as the Hub pipeline does -> model-space latents (B, 16, h, w)."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items = list(images)
        size = self.image_size
        arrays = []
        for i, item in enumerate(items):
            a = np.asarray(item.convert("RGB") if hasattr(item, "convert") else item)
            if a.ndim != 3 or a.shape[-1] != 3:
                raise ValueError(
                    f"controlnet_input {i}: expected an H x W x 3 RGB image, got shape {a.shape}"
                )
            if a.shape[:2] != (size, size):
                raise ValueError(
                    f"controlnet_input {i}: {a.shape[1]}x{a.shape[0]} px, expected {size}x{size}"
                )
            arrays.append(torch.from_numpy(np.array(a, dtype=np.float32)).permute(2, 0, 1) / 255.0)
        rendered = torch.stack(arrays).to(self._execution_device)  # (B, 3, H, W) in [0, 1]
        mean, _ = encode_posterior(self.vae, rendered)
        return latents_to_model(mean, self.vae)

    @torch.no_grad()
    def __call__(
        self,
        uni_embeds: Tensor | np.ndarray,  # (B, T, C_uni): the style reference(s)
        mask: MaskLike | Sequence[MaskLike] | None = None,  # B masks (or one, used for every row)
        controlnet_conditioning_scale: float = 1.0,  # 0: the base model alone
        controlnet_input: object = None,  # the Hub call's mask: H x W x 3 uint8 RGB (or PIL), / 255 inside
        **kwargs,  # PixCellPipeline.__call__: guidance_scale, num_inference_steps, generator, latents, ...
    ) -> ImagePipelineOutput | tuple:
        if (mask is None) == (controlnet_input is None):
            raise ValueError(
                "mask: required, as exactly one of mask= (a mask PNG path, PIL image, array or tensor, or a list of them) "
                "or controlnet_input= (H x W x 3 uint8 RGB, as the Hub pipeline takes it)"
            )
        uni = self.prepare_condition(uni_embeds)
        mask_latents = (
            self.encode_masks(mask) if mask is not None else self.encode_controlnet_input(controlnet_input)
        )
        if mask_latents.shape[0] == 1 and uni.shape[0] > 1:
            mask_latents = mask_latents.expand(uni.shape[0], -1, -1, -1)
        if mask_latents.shape[0] != uni.shape[0]:
            raise ValueError(
                f"mask: {mask_latents.shape[0]} masks for {uni.shape[0]} UNI embeddings (give one, or one per row)"
            )
        per_prompt = int(kwargs.get("num_images_per_prompt", 1))  # the conditions are repeated the same way
        mask_latents = mask_latents.repeat_interleave(max(per_prompt, 1), dim=0)
        self._control = (mask_latents, float(controlnet_conditioning_scale))
        try:
            return super().__call__(uni, **kwargs)
        finally:
            self._control = None


def check_pair(transformer: PixCellTransformer2DModel, controlnet: PixCellControlNet) -> None:
    """One ValueError line when the ControlNet was not made for this transformer (width, latent size, depth)."""
    t, c = transformer.config, controlnet.config
    fields = ("num_attention_heads", "attention_head_dim", "in_channels", "sample_size", "patch_size")
    diff = [f"{f} {getattr(c, f)} vs {getattr(t, f)}" for f in fields if getattr(c, f) != getattr(t, f)]
    if controlnet.num_blocks > len(transformer.transformer_blocks):
        diff.append(
            f"{controlnet.num_blocks} control blocks for {len(transformer.transformer_blocks)} blocks"
        )
    if diff:
        raise ValueError(
            f"controlnet does not fit the transformer (controlnet vs transformer: {'; '.join(diff)})"
        )


register_with_diffusers(PixCellControlNetPipeline)
