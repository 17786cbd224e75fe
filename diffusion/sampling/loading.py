"""The sampling tools' models, from typed sources: the pipeline (PixCell, optional ControlNet and LoRA) and UNI.

The tools read their flags into `PipelineSources` (tools/cli.py); everything here takes typed values and names
its parameters in backquotes (`lora`), which the tools show as their flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..encoders import UNIEncoder, load_uni
from ..geometry import DTYPES
from ..model.pixcell_transformer import compile_blocks
from .pipeline import PixCellPipeline
from .runner import model_reference


@dataclass(frozen=True)
class PipelineSources:
    """Where a sampling pipeline's weights come from, and how it runs."""

    model: str  # PixCell transformer: hub id, diffusers folder, original .pth/.ckpt, work dir, student folder
    vae: str  # SD3.5 VAE: hub id or local folder
    sampler: str | None = None  # None: the one recorded beside the model, else DPM-Solver++
    controlnet: str | None = None  # a cell-mask ControlNet (hub id, folder, training checkpoint)
    lora: str | None = None  # an adapter file (ours or a published *_lora.pth)
    lora_scale: float = 1.0
    dtype: str = "fp32"  # a key of diffusion.geometry.DTYPES
    compile: bool = False  # torch.compile each transformer block


def load_pipeline(sources: PipelineSources, device: torch.device) -> tuple[PixCellPipeline, str, str]:
    """The pipeline on `device` in `sources.dtype`, plus what the manifest names as model and VAE."""
    s = sources
    dtype = DTYPES[s.dtype]
    torch_dtype = None if dtype == torch.float32 else dtype  # fp32 is the stored dtype: no cast
    if s.lora and not Path(s.lora).is_file():
        raise FileNotFoundError(f"`lora` {s.lora}: no such file")
    if not s.lora and s.lora_scale != 1.0:
        raise ValueError("`lora_scale` needs `lora`")
    if s.controlnet:
        from .controlnet_pipeline import PixCellControlNetPipeline

        pipe = PixCellControlNetPipeline.from_parts(
            s.model, s.controlnet, s.vae, s.sampler, torch_dtype=torch_dtype
        )
    else:
        pipe = PixCellPipeline.from_parts(s.model, s.vae, s.sampler, torch_dtype=torch_dtype)
    pipe = pipe.to(device)
    if s.lora:
        pipe.load_lora_weights(s.lora, scale=s.lora_scale)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if s.compile:
        compile_blocks(pipe.transformer, True)
    model_ref = model_reference(s.model)
    if s.lora:  # the manifest (and a resumed run's check) names the adapter and its scale
        model_ref += f"+lora:{model_reference(s.lora)}@{s.lora_scale:g}"
    return pipe, model_ref, model_reference(s.vae)


def load_uni_encoder(source: str, device: torch.device, dtype: str, channels: int) -> UNIEncoder:
    """UNI from `source` in `dtype` on `device`; its embeddings must have the model's `channels`."""
    uni = load_uni(source, device)
    if uni.embed_dim != channels:
        raise ValueError(f"`uni` {source}: embeddings of dim {uni.embed_dim}, the model takes {channels}")
    uni.model.to(DTYPES[dtype])
    return uni


def default_batching(
    batch: int | None, workers: int | None, tokens: int, device: torch.device
) -> tuple[int, int]:
    """(batch, workers) for patch sampling: by default 64/T images on GPU, 8/T on CPU; 4 workers on GPU."""
    cuda = device.type == "cuda"
    chosen = batch if batch is not None else max(1, (64 if cuda else 8) // tokens)
    return chosen, workers if workers is not None else (4 if cuda else 0)
