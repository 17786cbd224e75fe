"""Command-line plumbing every tool shares: the common flags (model source, VAE, device, dtype, seed, output
format), defined once, and `run_cli`, which turns bad input into one `error: ...` line and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from diffusion.encoders import SD35_VAE_ID, UNI2H_HUB_ID
from diffusion.errors import USER_ERRORS, describe_error
from diffusion.geometry import DTYPES
from diffusion.training.signals import INTERRUPT_STATUS, interrupt_line
from diffusion.writable import check_writable

if TYPE_CHECKING:  # the sampling stack is imported by the tools that sample, not by every tool
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


def apply_lora_args(pipe, args: argparse.Namespace) -> None:
    """Load --lora into the pipeline's transformer at --lora-scale (nothing without --lora)."""
    if getattr(args, "lora", None):
        from pathlib import Path

        if not Path(args.lora).is_file():
            raise FileNotFoundError(f"--lora {args.lora}: no such file")
        pipe.load_lora_weights(args.lora, scale=args.lora_scale)
    elif getattr(args, "lora_scale", 1.0) != 1.0:
        raise ValueError("--lora-scale needs --lora")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --seed, --format."""
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    g.add_argument("--seed", type=int, default=0, help="base seed; per-image seeds derive from it")
    g.add_argument("--format", default="png", choices=["png", "jpeg"], help="image format (PNG is lossless)")


# The library names its parameters in backquotes (`n_images`) in its error messages; a tool shows the flag that
# sets that parameter. One mapping for every tool: a parameter keeps one flag name everywhere.
FLAGS = {
    "allow_negative_guidance": "--allow-negative-guidance",
    "guidance_scale": "--guidance",
    "num_inference_steps": "--steps",
    "stride": "--stride",
    "data_root": "--data-root",
    "dataset_regions": "--region",
    "features": "--features",
    "fmt": "--format",
    "grids": "--grid",
    "images": "--image",
    "index_file": "--index",
    "mask_dir": "--masks",
    "max_skips": "--max-skips",
    "n_images": "--n-images",
    "out_dir": "--out",
    "patches": "--patches",
    "region_size": "--region-size",
    "uni": "--uni",
    "vae": "--vae",
    "per_image": "--per-image",
    "per_class_total": "--per-class-total",
    "resize": "--resize",
    "crop": "--crop",
}


def flag_names(message: str) -> str:
    """A library error message as a tool shows it: each `parameter` of FLAGS becomes its --flag."""
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m[1], m[0]), message)


def error_line(err: BaseException) -> str:
    """The one `error: ...` line for bad input (a KeyError's message without its quotes, an OSError's path and
    cause), with the library's parameter names as the tools' flags."""
    return f"error: {flag_names(describe_error(err))}"


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a tool's main; bad input (ValueError, missing files, unavailable weights) is one line, exit 2; Ctrl-C
    is one line, exit 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as err:
        print(error_line(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line, no traceback (a trainer saved first: signals.py)
        print(interrupt_line(err), file=sys.stderr)
        return INTERRUPT_STATUS


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


def check_paths(**flags: Sequence[str | None] | None) -> None:
    """Missing input paths, before minutes of model loading: one line naming the flag."""
    for flag, paths in flags.items():
        for path in paths or ():
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file or folder")


def runtime_device(name: str) -> torch.device:
    """--device, with each `accelerate launch` process on its own GPU."""
    device = resolve_device(name)
    if device.type == "cuda":
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:
            return state.device
    return device


def load_pipeline(args: argparse.Namespace, device: torch.device) -> tuple[PixCellPipeline, str, str]:
    """The pipeline on `device` in --dtype, plus what the manifest names as model and VAE. Every numeric flag is
    checked first, and --out writable: a range error or a read-only output folder costs no model loading."""
    check_numeric_args(args)
    if getattr(args, "out", None):
        check_writable(args.out, "--out")
    from diffusion.model.pixcell_transformer import compile_blocks
    from diffusion.sampling.pipeline import PixCellPipeline
    from diffusion.sampling.runner import model_reference
    from diffusion.sampling.samplers import sampler_name

    dtype = DTYPES[args.dtype]
    torch_dtype = None if dtype == torch.float32 else dtype  # fp32 is the stored dtype: no cast
    if getattr(args, "controlnet", None):
        from diffusion.sampling.controlnet_pipeline import PixCellControlNetPipeline

        pipe = PixCellControlNetPipeline.from_parts(
            args.model, args.controlnet, args.vae, args.sampler, torch_dtype=torch_dtype
        ).to(device)
    else:
        pipe = PixCellPipeline.from_parts(args.model, args.vae, args.sampler, torch_dtype=torch_dtype).to(
            device
        )
    apply_lora_args(pipe, args)
    # Flags left unset take the defaults recorded beside the weights (a distilled student's sampling.json), so
    # run.json and the manifest record what was used.
    args.sampler = sampler_name(pipe.scheduler)
    # (tools/app.py chooses them per request: it has no such flags)
    args.guidance, args.steps = pipe.recorded_defaults(
        getattr(args, "guidance", None), getattr(args, "steps", None)
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.compile:
        compile_blocks(pipe.transformer, True)
    model_ref = model_reference(args.model)
    if getattr(
        args, "lora", None
    ):  # the manifest (and a resumed run's check) names the adapter and its scale
        model_ref += f"+lora:{model_reference(args.lora)}@{args.lora_scale:g}"
    return pipe, model_ref, model_reference(args.vae)


def load_uni_encoder(args: argparse.Namespace, device: torch.device, channels: int):
    """--uni in --dtype on `device`; its embeddings must have the model's `channels`."""
    from diffusion.encoders import load_uni

    uni = load_uni(args.uni, device)
    if uni.embed_dim != channels:
        raise ValueError(f"--uni {args.uni}: embeddings of dim {uni.embed_dim}, the model takes {channels}")
    uni.model.to(DTYPES[args.dtype])
    return uni


def patch_batching(args: argparse.Namespace, tokens: int, device: torch.device) -> tuple[int, int]:
    """(--batch, --workers) for patch sampling: by default 64/T images on GPU, 8/T on CPU; 4 workers on GPU."""
    cuda = device.type == "cuda"
    batch = args.batch if args.batch is not None else max(1, (64 if cuda else 8) // tokens)
    return batch, args.workers if args.workers is not None else (4 if cuda else 0)


def settings_from_args(args: argparse.Namespace, batch: int, workers: int) -> SampleSettings:
    """SampleSettings from the sampler, runtime and output flags."""
    from diffusion.sampling.runner import SampleSettings

    check_numeric_args(args)
    if batch < 1:
        raise ValueError(f"--batch {batch}: expected >= 1")
    return SampleSettings(
        sampler=args.sampler,
        steps=args.steps,
        guidance=args.guidance,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        allow_negative_guidance=args.allow_negative_guidance,
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


def run_with_default_model(module: str, model: str, argv: Sequence[str] | None) -> int:
    """An alias tool (tools.sample_256): `module`'s main with --model defaulting to `model` (a --model given
    on the command line comes later and wins: argparse keeps the last value)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return int(importlib.import_module(module).main(["--model", model, *args]) or 0)


#################################################################################
#               Feature tools (tools.extract_features, tools.pack_features)     #
#################################################################################


class FailureCounter:
    """Counts bad inputs of a long loop; logs each with a running count; raises past the allowed rate."""

    def __init__(self, max_rate: float, min_failures: int, log_file: Path | None, what: str = "patches"):
        self.max_rate, self.min_failures, self.log_file, self.what = max_rate, min_failures, log_file, what
        self.ok = 0
        self.failed = 0

    def success(self, n: int = 1) -> None:
        self.ok += n

    def failure(self, path: str, reason: str) -> None:
        self.failed += 1
        seen = self.ok + self.failed
        tqdm.write(f"skip {path}: {reason} [{self.failed} of {seen} {self.what} failed so far]")
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "a") as fh:
                fh.write(f"{path}\t{reason}\n")
        if self.failed >= self.min_failures and self.failed / seen > self.max_rate:
            raise RuntimeError(
                f"{self.failed} of {seen} {self.what} failed ({self.failed / seen:.1%} > "
                f"--max-failure-rate {self.max_rate:.1%}); last: {path}: {reason}"
            )


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


def feature_cache(args: argparse.Namespace):
    """The FeatureCache the flags of add_feature_args ask for, or None (--no-cache)."""
    from diffusion.metrics.cache import FeatureCache, default_feature_cache_dir

    if args.no_cache:
        return None
    root = args.cache_dir or default_feature_cache_dir()
    check_writable(
        root, "--cache-dir"
    )  # before the encoders load and embed, not when the first entry is saved
    return FeatureCache(root)
