"""The flags every tool shares (model source, VAE, device, dtype, seed, sampler, output), defined once, and
their reading into the library's typed settings (`pipeline_sources`, `sample_settings`). Nothing here loads a
model or runs a tool: `diffusion.command.run_cli` runs them, `diffusion.sampling.loading` loads their models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffusion.encoders import SD35_VAE_ID, UNI2H_HUB_ID
from diffusion.geometry import DTYPES
from diffusion.writable import check_writable

if TYPE_CHECKING:  # the sampling stack is imported by the tools that sample, not by every tool
    from diffusion.sampling.loading import PipelineSources
    from diffusion.sampling.pipeline import PixCellPipeline
    from diffusion.sampling.runner import SampleSettings


def add_model_args(parser: argparse.ArgumentParser, model_default: str | None = None) -> None:
    """--model, --vae, --uni: where the real weights come from (hub id, local folder or file)."""
    g = parser.add_argument_group("models")
    g.add_argument(
        "--model",
        default=model_default,
        required=model_default is None,
        help="PixCell transformer: hub id (StonyBrook-CVLab/PixCell-256), diffusers folder, or original .pth/.ckpt",
    )
    g.add_argument("--vae", default=SD35_VAE_ID, help="SD3.5 VAE: hub id (subfolder vae) or local folder")
    g.add_argument(
        "--uni", default=UNI2H_HUB_ID, help="UNI2-h: hf-hub:MahmoodLab/UNI2-h, a local folder or weights file"
    )


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """--lora, --lora-scale: a LoRA adapter on the transformer (train_scripts/train_lora.py, or a published .pth)."""
    g = parser.add_argument_group("LoRA adapter")
    g.add_argument("--lora", help="adapter file: lora.safetensors of a LoRA run, or a published *_lora.pth")
    g.add_argument(
        "--lora-scale", type=float, default=1.0, help="adapter strength (1: as trained, 0: base model)"
    )


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --seed, --format."""
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    g.add_argument("--seed", type=int, default=0, help="base seed; per-image seeds derive from it")
    g.add_argument("--format", default="png", choices=["png", "jpeg"], help="image format (PNG is lossless)")


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --guidance, --guidance-interval: one guidance convention, eps_u + w (eps_c - eps_u)."""
    from diffusion.sampling.samplers import SAMPLERS

    g = parser.add_argument_group("sampler")
    g.add_argument(
        "--sampler",
        default=None,
        choices=list(SAMPLERS),
        help="default: the one recorded beside the model (a distilled student: lcm), else DPM-Solver++ (2M); "
        "sde-dpm-solver and euler-ancestral are SDE samplers",
    )
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="default: the model's recorded steps (a student: 4), else 20 (dpm-solver, sde-dpm-solver), 50 (ddim), "
        "25 (sa-solver), 100 (ddpm), 30 (euler-ancestral)",
    )
    g.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="w in eps_u + w (eps_c - eps_u) (a student: its guidance input); default: the model's recorded "
        "guidance, else 2.0 at 256 px, 1.2 at 1024",
    )
    g.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="guide only for timesteps t in [LOW, HIGH] (of 0..999), as CytoSyn does; unguided elsewhere",
    )
    g.add_argument(
        "--allow-negative-guidance",
        action="store_true",
        help="accept --guidance < 0 (pushes samples away from their condition); an error otherwise",
    )


# Each numeric flag and the library parameter whose range it takes (diffusion/sampling/limits.py).
NUMERIC_FLAGS = {
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "batch": "batch_size",
    "batch_size": "batch_size",
    "vae_batch": "vae_batch",
    "window_batch": "window_batch",
    "workers": "workers",
    "num_workers": "workers",
    "max_skips": "max_skips",
    "jpeg_quality": "jpeg_quality",
    "n_images": "n_images",
    "prior_steps": "prior_steps",
    "prior_guidance": "prior_guidance",
    "stride": "stride",
    "decode_stride": "decode_stride",
    "sigma": "sigma",
    "lora_scale": "lora_scale",
    "controlnet_scale": "controlnet_scale",
}


def check_numeric_args(args: argparse.Namespace) -> None:
    """Every numeric flag a tool has, in range (`limits.check_limits`), before any model loads: one line naming
    the flag. --steps is bounded by what the sampler takes: --sampler, else the one recorded beside the model."""
    from diffusion.model.student import read_sampling_defaults
    from diffusion.sampling.limits import check_limits

    sampler = getattr(args, "sampler", None)
    if sampler is None and getattr(args, "model", None):
        # The sampler recorded beside the weights (a JSON file, no loading), else DPM-Solver++: the default of
        # every model but a student without sampling.json, whose LCM takes fewer steps (checked after loading).
        sampler = read_sampling_defaults(args.model).get("sampler", "dpm-solver")
    for attr, param in NUMERIC_FLAGS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        try:
            check_limits(
                {param: value},
                sampler,
                getattr(args, "allow_negative_guidance", False),
            )
        except ValueError as err:
            raise ValueError(str(err).replace(f"`{param}`", f"--{attr.replace('_', '-')}")) from None
    check_sampler_args(args)


def check_sampler_args(args: argparse.Namespace) -> None:
    """--guidance-interval, which argparse cannot check, before any model loads."""
    interval = getattr(args, "guidance_interval", None)
    if interval is not None:
        low, high = interval
        if not 0 <= low <= high <= 1000:  # NaN fails too
            raise ValueError(f"--guidance-interval {low} {high}: expected 0 <= LOW <= HIGH <= 1000")


#################################################################################
#                    Sampling tools (tools.sample, tools.sample_4k)             #
#################################################################################


def add_output_args(parser: argparse.ArgumentParser, real: bool = True) -> None:
    """Output and throughput flags shared by the sampling tools (real=False: no real images to write)."""
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (syn/, real/, manifest.jsonl, run.json)")
    if real:
        g.add_argument("--no-real", action="store_true", help="do not write the real reference images")
    g.add_argument("--jpeg-quality", type=int, default=95, help="with --format jpeg")
    g.add_argument("--vae-batch", type=int, default=None, help="images (windows) per VAE decode call")
    g.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default: 4 on GPU, 0 on CPU)"
    )
    g.add_argument("--max-skips", type=int, default=100, help="stop after more unusable conditions than this")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block (GPU runs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def pipeline_sources(args: argparse.Namespace) -> PipelineSources:
    """The pipeline the model, LoRA, ControlNet, sampler and runtime flags ask for. Every numeric flag is checked
    first, and --out writable: a range error or a read-only output folder costs no model loading."""
    from diffusion.sampling.loading import PipelineSources

    check_numeric_args(args)
    if getattr(args, "out", None):
        check_writable(args.out, "--out")

    return PipelineSources(
        model=args.model,
        vae=args.vae,
        sampler=getattr(args, "sampler", None),
        controlnet=getattr(args, "controlnet", None),
        lora=getattr(args, "lora", None),
        lora_scale=getattr(args, "lora_scale", 1.0),
        dtype=args.dtype,
        compile=getattr(args, "compile", False),
    )


def sample_settings(
    args: argparse.Namespace, pipe: PixCellPipeline, batch: int, workers: int
) -> SampleSettings:
    """SampleSettings from the sampler, runtime and output flags, with steps and guidance resolved once for
    `pipe` (flags given, else the defaults recorded beside its weights, else the published ones)."""
    check_numeric_args(args)
    if batch < 1:
        raise ValueError(f"--batch {batch}: expected >= 1")
    from diffusion.sampling.runner import SampleSettings

    interval = tuple(args.guidance_interval) if args.guidance_interval else None
    return SampleSettings(
        sampling=pipe.sampling_options(args.steps, args.guidance, interval, args.allow_negative_guidance),
        seed=args.seed,
        dtype=args.dtype,
        format=args.format,
        jpeg_quality=args.jpeg_quality,
        batch_size=batch,
        vae_batch=args.vae_batch,
        workers=workers,
        write_real=not getattr(args, "no_real", True),
        max_skips=args.max_skips,
        progress=not args.no_progress,
    )


#################################################################################
#               Feature tools (tools.extract_features, tools.pack_features)     #
#################################################################################


def add_index_args(p: argparse.ArgumentParser, verb: str) -> None:
    """--root, --index, --keys: the patches a feature tool works on (this one and pack_features)."""
    p.add_argument("--root", type=Path, required=True, help="patches root")
    p.add_argument(
        "--index", type=Path, default=None, help="index file (default <root>/metadata/patch_names_all.hdf5)"
    )
    p.add_argument("--keys", nargs="+", default=None, help=f"index keys to {verb} (default: all)")


def add_failure_args(p: argparse.ArgumentParser, log_default: str) -> None:
    """--max-failure-rate, --min-failures-before-stop, --failure-log: the FailureCounter's settings."""
    p.add_argument("--max-failure-rate", type=float, default=0.01)
    p.add_argument("--min-failures-before-stop", type=int, default=10)
    p.add_argument("--failure-log", type=Path, default=None, help=f"default: {log_default}")


#################################################################################
#        Encoder-feature tools (probe, audit): encoder runtime and cache        #
#################################################################################


def add_feature_args(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --batch-size, --num-workers, --cache-dir, --no-cache, --no-progress for tools that
    embed image folders with the metrics' encoders (cache shared with tools/evaluate.py)."""
    import os

    g = parser.add_argument_group("encoders")
    g.add_argument("--device", default="cpu", help="encoder device")
    g.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="encoder dtype")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding workers"
    )
    g.add_argument(
        "--cache-dir", help="feature cache (default: $PIXCELL_EVAL_CACHE or ~/.cache/pixcell/eval_features)"
    )
    g.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
