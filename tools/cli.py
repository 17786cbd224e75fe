"""Command-line plumbing every tool shares: the common flags (model source, VAE, device, dtype, seed, output
format), defined once, and `run_cli`, which turns bad input into one `error: ...` line and exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import torch

from diffusion.encoders import SD35_VAE_ID, UNI2H_HUB_ID
from diffusion.geometry import DTYPES


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


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --seed, --format."""
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    g.add_argument("--seed", type=int, default=0, help="base seed; per-image seeds derive from it")
    g.add_argument("--format", default="png", choices=["png", "jpeg"], help="image format (PNG is lossless)")


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a tool's main; bad input (ValueError, missing files, unavailable weights) is one line, exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(main(argv) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, OSError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --guidance, --guidance-interval: one guidance convention, eps_u + w (eps_c - eps_u)."""
    from diffusion.sampling.samplers import SAMPLERS

    g = parser.add_argument_group("sampler")
    g.add_argument(
        "--sampler", default="dpm-solver", choices=list(SAMPLERS), help="default: DPM-Solver++ (2M)"
    )
    g.add_argument(
        "--steps", type=int, default=None, help="default: 20 (dpm-solver), 50 (ddim), 25, 100 (ddpm)"
    )
    g.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="w in eps_u + w (eps_c - eps_u); default 2.0 at 256 px, 1.2 at 1024",
    )
    g.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="guide only for timesteps t in [LOW, HIGH] (of 0..999), as CytoSyn does; unguided elsewhere",
    )


def check_sampler_args(args: argparse.Namespace) -> None:
    """One-line errors for sampler flags that argparse cannot check."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: expected >= 1")
    if args.guidance_interval is not None:
        low, high = args.guidance_interval
        if not 0 <= low <= high <= 1000:
            raise ValueError(f"--guidance-interval {low} {high}: expected 0 <= LOW <= HIGH <= 1000")
