"""How every entry point (tools, trainers, the staining CLI) meets its user: bad input is one `error: ...` line
and exit status 2 (`run_cli`), with the library's parameter names shown as the tools' flags (`FLAGS`).

The library names its parameters in backquotes (`n_images`) in its error messages; a tool shows the flag that sets
that parameter. One mapping for every tool: a parameter keeps one flag name everywhere.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import USER_ERRORS, describe_error
from .training.signals import INTERRUPT_STATUS, interrupt_line

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
    "lora": "--lora",
    "lora_scale": "--lora-scale",
    "cache_dir": "--cache-dir",
}


def flag_names(message: str) -> str:
    """A library error message as a tool shows it: each `parameter` of FLAGS becomes its --flag."""
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m[1], m[0]), message)


def error_line(err: BaseException) -> str:
    """The one `error: ...` line for bad input (a KeyError's message without its quotes, an OSError's path and
    cause), with the library's parameter names as the tools' flags."""
    return f"error: {flag_names(describe_error(err))}"


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


def run_with_default_model(module: str, model: str, argv: Sequence[str] | None) -> int:
    """An alias tool (tools.sample_256): `module`'s main with --model defaulting to `model` (a --model given
    on the command line comes later and wins: argparse keeps the last value)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return int(importlib.import_module(module).main(["--model", model, *args]) or 0)


def resolve_device(name: str) -> torch.device:
    """--device as a torch device; CUDA asked for on a machine without it is one line."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def runtime_device(name: str) -> torch.device:
    """--device, with each `accelerate launch` process on its own GPU."""
    device = resolve_device(name)
    if device.type == "cuda":
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:
            return state.device
    return device


def check_paths(**flags: Sequence[str | None] | None) -> None:
    """Missing input paths, before minutes of model loading: one line naming the flag."""
    for flag, paths in flags.items():
        for path in paths or ():
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file or folder")
