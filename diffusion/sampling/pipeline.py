"""PixCellPipeline: UNI2-h embeddings in, H&E images out (a diffusers `DiffusionPipeline`).

    pipe = PixCellPipeline.from_pretrained("StonyBrook-CVLab/PixCell-256")   # VAE: SD3.5 (gated) by default
    images = pipe(uni_embeds, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images

The number of UNI tokens fixes the image: T = 1 -> 256 px, 16 -> 1024 px (the transformer's trained size,
`sample_size * 8`); a condition with another T or dim, or with NaNs, is a one-line ValueError.

The call also takes the Hub remote pipeline's arguments as its callers pass them (`../shared/formats/hub_api.md`):
`get_unconditional_embedding`, `num_images_per_prompt`, `height`/`width` (checked), the legacy
`callback`/`callback_steps` and diffusers' `callback_on_step_end`. One documented difference: with guidance
above 1 the Hub pipeline refuses a call without `negative_uni_embeds`; ours fills in the model's null condition,
which is what `get_unconditional_embedding` returns, so both give the same images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor

from ..encoders import (
    SD35_VAE_ID,
    decode_latents,
    encode_posterior,
    latents_to_model,
    load_vae,
    to_uint8,
    vae_scale_factor,
)
from ..model.loading import load_transformer
from ..model.lora import add_lora, has_lora, load_lora_weights, merge_lora, read_lora_file, set_lora_scale
from ..model.pixcell_transformer import PixCellTransformer2DModel
from ..model.student import read_sampling_defaults
from .checks import check_images, condition_problem
from .hub import (
    check_pipeline_class,
    refuse_diffusers_loading,
    register_with_diffusers,
    resolve_snapshot,
    saved_scheduler,
    vae_folder,
)
from .samplers import (
    SamplingOptions,
    denoise,
    guidance_in_model,
    guided_prediction,
    guides,
    make_scheduler,
    resolve_sampling,
    sampler_name,
    transformer_fn,
)

log = logging.getLogger("pixcell.pipeline")
# Images the editing paths take: (B, C, H, W) tensors in [0, 1], uint8 arrays, or PIL images
ImageLike = Tensor | np.ndarray | Sequence[Image.Image]


class PixCellPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->vae"

    def __init__(
        self,
        transformer: PixCellTransformer2DModel,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        defaults: dict | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        # Sampling defaults recorded beside the weights (a distilled student's sampling.json): sampler, steps,
        # guidance. A student without one samples with LCM.
        self.defaults = dict(defaults or {})
        if guidance_in_model(transformer):
            self.defaults.setdefault("sampler", "lcm")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_parts(
        cls,
        transformer: str | Path | PixCellTransformer2DModel,
        vae: str | Path | object = SD35_VAE_ID,
        sampler: str | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> PixCellPipeline:
        """Assemble from a transformer (hub id, diffusers folder, original checkpoint, student, or model) and a
        VAE. `sampler` None: the one recorded beside the weights (a student's), else DPM-Solver++."""
        defaults = {}
        if not isinstance(transformer, torch.nn.Module):
            defaults = read_sampling_defaults(transformer)
            transformer = load_transformer(transformer, torch_dtype=torch_dtype)
        if not isinstance(vae, torch.nn.Module):
            vae = load_vae(vae, torch_dtype=torch_dtype)
        if guidance_in_model(transformer):
            defaults.setdefault("sampler", "lcm")
        scheduler = make_scheduler(sampler or defaults.get("sampler", "dpm-solver"))
        return cls(transformer=transformer, vae=vae, scheduler=scheduler, defaults=defaults)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        vae: str | Path | torch.nn.Module | None = None,
        sampler: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **hub_kwargs: object,  # the Hub call's custom_pipeline, trust_remote_code, ...: accepted, never needed
    ) -> PixCellPipeline:
        """Load a pipeline snapshot (hub id or folder: model_index.json + transformer/ + scheduler/ (+ vae/)), or
        a transformer source (transformer folder, original checkpoint, training work dir).

        Nothing in the snapshot is executed: its transformer loads into our class, its scheduler config into our
        sampler (logged; `sampler` or `set_sampler` overrides it). The VAE: `vae` (hub id, folder or an
        `AutoencoderKL`, as the model card passes it), else the snapshot's vae/, else SD3.5's.
        """
        if hub_kwargs:
            log.info("ignored (the Hub remote pipeline's loading options): %s", ", ".join(sorted(hub_kwargs)))
        folder = resolve_snapshot(source, with_vae=vae is None)
        if folder is None:
            return cls.from_parts(source, vae or SD35_VAE_ID, sampler, torch_dtype)
        check_pipeline_class(
            folder,
            cls.__name__,
            {"PixCellControlNetPipeline": "diffusion.sampling.controlnet_pipeline.PixCellControlNetPipeline"}
            if cls is PixCellPipeline
            else {},
        )
        pipe = cls.from_parts(
            folder / "transformer", vae or vae_folder(folder) or SD35_VAE_ID, sampler, torch_dtype
        )
        pipe.use_saved_scheduler(folder, sampler)
        return pipe

    def use_saved_scheduler(self, folder: Path, sampler: str | None) -> None:
        """Take the snapshot's scheduler config unless `sampler` names one."""
        saved = saved_scheduler(folder) if sampler is None else None
        if saved is not None:
            self.scheduler = saved

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs: object) -> None:
        """Reached only through `diffusers.DiffusionPipeline.from_pretrained(snapshot)` (our loaders never read
        model_index.json this way): stop there with one line, before diffusers imports the snapshot's code."""
        raise refuse_diffusers_loading(cls)

    def set_sampler(self, name: str) -> None:
        """Switch sampler: 'dpm-solver' (default), 'ddim', 'sa-solver', 'ddpm' (ancestral, learned variance),
        'sde-dpm-solver', 'euler-ancestral' (SDE samplers), 'lcm' (a distilled student's)."""
        self.scheduler = make_scheduler(name)

    # ------------------------------------------------------------------ LoRA adapters

    def load_lora_weights(self, path: str | Path, scale: float = 1.0) -> None:
        """Add a LoRA adapter to the transformer (ours: adapter-only safetensors; published: the whole adapted
        transformer `.pth`), at `scale` times its trained strength (diffusers' `load_lora_weights` + scale)."""
        if has_lora(self.transformer):
            raise ValueError("the transformer has a LoRA adapter already (one adapter per pipeline)")
        state, settings = read_lora_file(path)
        dtype = next(self.transformer.parameters()).dtype
        add_lora(self.transformer, settings)
        load_lora_weights(self.transformer, path, state)
        self.transformer.to(device=self._execution_device, dtype=dtype)  # peft creates the adapter in fp32
        self.transformer.requires_grad_(False)
        set_lora_scale(self.transformer, scale)
        log.info("LoRA %s: rank %d on %s, scale %g", path, settings.rank, ", ".join(settings.targets), scale)

    def set_lora_scale(self, scale: float) -> None:
        set_lora_scale(self.transformer, scale)

    def fuse_lora(self) -> None:
        """Fold the adapter (at its current scale) into the transformer's weights: a plain model again."""
        device = self._execution_device
        self.register_modules(transformer=merge_lora(self.transformer).to(device))

    def sampling_options(
        self,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        allow_negative_guidance: bool = False,
    ) -> SamplingOptions:
        """This pipeline's sampler with `steps` and `guidance` resolved (`resolve_sampling`: the defaults
        recorded beside the weights, else the published ones for the model's token count)."""
        return resolve_sampling(
            sampler_name(self.scheduler),
            steps,
            guidance,
            self.transformer.config.caption_num_tokens,
            self.defaults,
            guidance_interval,
            allow_negative_guidance,
        )

    # ------------------------------------------------------------------ sampling

    def get_unconditional_embedding(self, batch_size: int = 1) -> Tensor:
        """The null condition (B, T, C): the transformer's `caption_projection.uncond_embedding` over the batch,
        as the Hub pipeline returns it for `negative_uni_embeds`."""
        return self.transformer.null_condition(batch_size).to(self._execution_device)

    def model_fn(self, guidance_scale: float | None = None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """The (x, cond, t) -> (B, 32, h, w) callable the sampler guides (a student: guided by its input
        `guidance_scale`); the ControlNet pipeline extends it."""
        return transformer_fn(self.transformer, guidance_scale)

    @property
    def image_size(self) -> int:
        return self.transformer.config.sample_size * vae_scale_factor(self.vae)

    def prepare_condition(self, uni_embeds: Tensor | np.ndarray) -> Tensor:
        uni = torch.as_tensor(uni_embeds, dtype=torch.float32)
        if uni.ndim == 2:  # a single image's tokens
            uni = uni.unsqueeze(0)
        self.transformer.check_condition(uni)
        for i, row in enumerate(uni):  # finite but extreme: its image would come out black
            problem = condition_problem(row)
            if problem is not None:
                raise ValueError(f"uni_embeds: row {i}: {problem.removeprefix('its condition ')}")
        return uni

    def check_size(self, height: int | None, width: int | None, tokens: int) -> None:
        """The Hub call's height/width must be what the token count gives (this model's trained size)."""
        size = self.image_size
        if (height is not None and height != size) or (width is not None and width != size):
            raise ValueError(
                f"height/width {height}x{width}: this model makes {size}x{size} px images from {tokens} UNI "
                "token(s) (one token per 256 px tile); leave height/width out or pass the model's size"
            )

    def step_callback(
        self,
        callback: Callable[[int, Tensor, Tensor], None] | None,
        callback_steps: int,
        on_step_end: Callable[..., dict] | None,
        tensor_inputs: Sequence[str],
    ) -> Callable[[int, Tensor, Tensor], Tensor | None] | None:
        """The Hub call's callbacks as one `denoise(on_step=...)`: the legacy PixArt `callback(i, t, latents)`
        every `callback_steps` steps, and diffusers' `callback_on_step_end(pipe, i, t, {"latents": ...})`, whose
        returned "latents" replace the current ones."""
        if callback is None and on_step_end is None:
            return None
        if callback_steps is None or int(callback_steps) < 1:
            raise ValueError(f"callback_steps {callback_steps}: expected a positive integer")
        unknown = [name for name in tensor_inputs if name != "latents"]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not available (only 'latents')")

        def on_step(i: int, t: Tensor, x: Tensor) -> Tensor | None:
            if callback is not None and i % int(callback_steps) == 0:
                callback(i, t, x)
            if on_step_end is not None:
                out = on_step_end(self, i, t, {name: x for name in tensor_inputs}) or {}
                return out.get("latents")
            return None

        return on_step

    def prepare_edit(
        self,
        image: ImageLike | None,
        strength: float,
        mask_image: ImageLike | None,
        feather: int,
        noise: Tensor,  # (B, 16, h, w) the initial noise
        steps: int,
        per_prompt: int,
        on_step: Callable[[int, Tensor, Tensor], Tensor | None] | None,
    ) -> tuple[Tensor, int, Callable[[int, Tensor, Tensor], Tensor | None] | None]:
        """img2img / inpainting (diffusion/sampling/editing.py): -> (starting latents, first step, on_step)."""
        from .editing import check_edit_sampler, latent_mask, noised, start_step

        if image is None:
            if strength != 1.0 or mask_image is not None:
                raise ValueError("`strength` below 1 and `mask_image` need an `image` to start from")
            return noise, 0, on_step
        check_edit_sampler(sampler_name(self.scheduler))
        pixels = self.as_pixels(image, 3).repeat_interleave(per_prompt, dim=0).to(noise.device)
        if pixels.shape[0] != noise.shape[0] or pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"image: {tuple(pixels.shape)} for {noise.shape[0]} images of {self.image_size} px (one per condition)"
            )
        known = latents_to_model(encode_posterior(self.vae, pixels)[0], self.vae).float()
        start = start_step(steps, strength)
        self.scheduler.set_timesteps(steps)
        timesteps = self.scheduler.timesteps
        x = noised(known, noise, timesteps[start]) if start > 0 else noise
        if mask_image is None:
            return x, start, on_step
        mask = latent_mask(self.as_pixels(mask_image, 1), tuple(noise.shape[-2:]), feather)
        mask = mask.repeat_interleave(per_prompt, dim=0).to(noise.device)

        def blend(i: int, t: Tensor, x: Tensor) -> Tensor | None:
            nxt = timesteps[i + 1] if i + 1 < len(timesteps) else None
            x = mask * x + (1 - mask) * noised(known, noise, nxt)
            replaced = on_step(i, t, x) if on_step is not None else None
            return x if replaced is None else replaced

        return x, start, blend

    def composite(
        self, decoded: Tensor, image: ImageLike, mask_image: ImageLike, feather: int, per_prompt: int
    ) -> Tensor:
        """Inpainting's output: the decoded images inside the (feathered) mask, the input image outside, blended
        over the mask's ramp (the latent mask upsampled to pixels)."""
        from .editing import latent_mask

        pixels = self.as_pixels(image, 3).repeat_interleave(per_prompt, dim=0).to(decoded.device)
        size = tuple(s // vae_scale_factor(self.vae) for s in decoded.shape[-2:])
        mask = latent_mask(self.as_pixels(mask_image, 1), size, feather).repeat_interleave(per_prompt, dim=0)
        mask = torch.nn.functional.interpolate(mask, size=decoded.shape[-2:], mode="bilinear").to(
            decoded.device
        )
        return mask * decoded + (1 - mask) * pixels

    @staticmethod
    def as_pixels(images: ImageLike, channels: int) -> Tensor:
        """Images (PIL list, (B, H, W, C) uint8 array, or (B, C, H, W) tensor in [0, 1]) -> (B, C, H, W) float."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            mode = "RGB" if channels == 3 else "L"
            images = np.stack([np.asarray(im.convert(mode)) for im in images])
        if isinstance(images, np.ndarray):
            arr = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
            if arr.ndim == 3:
                arr = arr[..., None] if channels == 1 else arr[None]
            images = torch.from_numpy(arr).permute(0, 3, 1, 2)
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(f"expected (B, {channels}, H, W) images in [0, 1], got {tuple(images.shape)}")
        return images

    @torch.no_grad()
    def __call__(
        self,
        uni_embeds: Tensor | np.ndarray,  # (B, T, C_uni)
        guidance_scale: float | None = None,  # None: 2.0 at T=1, 1.2 at T=16 (published)
        num_inference_steps: int | None = None,  # None: 20 for DPM-Solver++
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor
        | None = None,  # (B * num_images_per_prompt, 16, h, w) initial noise, for exact seeding
        negative_uni_embeds: Tensor | None = None,  # unconditional input; default: the model's null condition
        guidance_interval: tuple[float, float] | None = None,  # guide only for timesteps in [low, high]
        allow_negative_guidance: bool = False,  # a guidance_scale < 0 is an error unless this says it is meant
        # resolved settings (the runner's and the app's); then guidance_scale, num_inference_steps,
        # guidance_interval and allow_negative_guidance stay unset
        options: SamplingOptions | None = None,
        output_type: str = "pil",  # 'pil' | 'np' | 'pt' | 'latent'
        return_dict: bool = True,
        progress: bool = True,
        num_images_per_prompt: int = 1,  # images per condition, each with its own noise
        height: int | None = None,  # Hub call: checked against the model's size, which the tokens fix
        width: int | None = None,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,  # legacy (PixArt): (step, t, latents)
        callback_steps: int = 1,
        callback_on_step_end: Callable[..., dict] | None = None,  # diffusers: (pipe, step, t, kwargs) -> dict
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        image: Tensor
        | np.ndarray
        | Sequence[Image.Image]
        | None = None,  # img2img / inpainting: (B, 3, H, W) in [0, 1]
        strength: float = 1.0,  # SDEdit: the fraction of the steps run from the noised image (1: from noise)
        mask_image: Tensor | np.ndarray | Sequence[Image.Image] | None = None,  # (B, 1, H, W), 1 = regenerate
        mask_feather: int = 2,  # latent px over which the mask's border is blended
        # NaN/Inf or collapsed latents/images raise UnusableImage (False: the caller checks)
        check_output: bool = True,
    ) -> ImagePipelineOutput | tuple:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")
        if int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt {num_images_per_prompt}: expected >= 1")
        device = self._execution_device
        uni = self.prepare_condition(uni_embeds).to(device)
        tokens = uni.shape[1]
        self.check_size(height, width, tokens)
        on_step = self.step_callback(
            callback, callback_steps, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        k = int(num_images_per_prompt)
        uni = uni.repeat_interleave(k, dim=0)  # row i*k+j: image j of condition i (diffusers' order)
        batch = uni.shape[0]
        if options is None:
            options = self.sampling_options(
                num_inference_steps, guidance_scale, guidance_interval, allow_negative_guidance
            )
        elif (guidance_scale, num_inference_steps, guidance_interval) != (None, None, None):
            raise ValueError(
                "give `options` or guidance_scale / num_inference_steps / guidance_interval, not both"
            )
        elif options.sampler != sampler_name(self.scheduler):
            raise ValueError(
                f"options.sampler {options.sampler!r}, but the pipeline samples with "
                f"{sampler_name(self.scheduler)!r} (set_sampler first)"
            )
        steps, w, guidance_interval = options.steps, options.guidance, options.guidance_interval
        student = guidance_in_model(self.transformer)  # w is the student's input: no unconditional pass

        size = self.transformer.config.sample_size
        shape = (batch, self.transformer.config.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        uncond = None
        if guides(w) and not student:
            if negative_uni_embeds is None:
                uncond = self.transformer.null_condition(batch)
            else:
                uncond = self.prepare_condition(negative_uni_embeds)
                if uncond.shape[0] * k == batch:  # one per condition, as the Hub callers pass it
                    uncond = uncond.repeat_interleave(k, dim=0)
                if uncond.shape[0] != batch:
                    raise ValueError(
                        f"negative_uni_embeds: {uncond.shape[0]} rows for {batch // k} conditions (give one per "
                        "condition, or leave it out for the model's null condition)"
                    )
            uncond = uncond.to(device)

        fn = self.model_fn(w) if student else self.model_fn()
        latents, start, on_step = self.prepare_edit(
            image, strength, mask_image, mask_feather, latents.to(device), steps, k, on_step
        )
        x = denoise(
            lambda x, t: guided_prediction(fn, x, t, uni, uncond, w, guidance_interval),
            latents,
            self.scheduler,
            steps,
            generator=generator,
            progress=progress,
            on_step=on_step,
            start=start,
        )
        names = [f"image {i}" for i in range(batch)]
        if check_output:
            check_images(x, names, "latents", uni)
        if output_type == "latent":
            images = x
        else:
            images = decode_latents(self.vae, x)  # (B, 3, H, W) in [0, 1]
            if (
                mask_image is not None and image is not None
            ):  # inpainting: the kept pixels are the image's own
                images = self.composite(images, image, mask_image, mask_feather, k)
            if check_output:
                check_images(images, names, "decoded image", uni)
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                images = [Image.fromarray(a) for a in to_uint8(images)]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


register_with_diffusers(PixCellPipeline)
