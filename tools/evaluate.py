"""Evaluate synthetic images against real ones: Inception FID/KID (clean-fid), Frechet distances in
pathology-encoder feature spaces, and real-vs-synthetic embedding similarity. One command, one report.

    python -m tools.evaluate REAL SYN --out report_dir
    python -m tools.evaluate REAL SYN --out report_dir --metrics fid,fd_uni2,cos_uni2,fd_hoptimus0 \\
        --encoder uni2=/weights/uni2h/pytorch_model.bin --encoder hoptimus0=/weights/H-optimus-0 \\
        --inception /weights/inception-2015-12-05.pt

    # no weights anywhere: the encoder-free morphology distance (stains, nuclei, sharpness) alone
    python -m tools.evaluate REAL SYN --out report_dir

REAL and SYN are folders of PNG/JPEG/TIFF images; the paired metric (cos_NAME) matches them by file name.
Writes metrics.json, report.md, report.png and pairs.csv into --out. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from diffusion.command import error_line, run_cli
from diffusion.errors import USER_ERRORS
from diffusion.metrics.encoders import FEATURE_ENCODERS, parse_encoder_spec
from diffusion.metrics.evaluation import CACHE_MODES, DTYPES, MORPHOLOGY, evaluate, resolve_plan
from tools.cli import check_numeric_args

__all__ = ["evaluate", "main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "metrics: fid, kid (Inception, clean-fid), fd_NAME, kid_NAME, cos_NAME for an encoder NAME, and\n"
            "morphology (no encoder: stains, nuclei, sharpness; the default when no weights are given).\n"
            f"encoder presets: {', '.join(FEATURE_ENCODERS)}. Define or override one with\n"
            "  --encoder NAME=SOURCE[,arch=TIMM_NAME][,size=224][,mean=a/b/c][,std=a/b/c][,pool=model|cls|mean|cls+mean]"
            "[,timm_kwarg=value]\n"
            "SOURCE: hf-hub:ORG/REPO, a folder (config.json + weights), a weights file, or a timm model name."
        ),
    )
    p.add_argument("real", help="folder of real images (the reference set)")
    p.add_argument("syn", help="folder of synthetic images (same file names as REAL for the cos_ metrics)")
    p.add_argument(
        "--out", required=True, help="report folder (metrics.json, report.md, report.png, pairs.csv)"
    )
    p.add_argument(
        "--metrics",
        help="comma-separated; default: morphology when no --encoder/--encoders/--inception is given, else "
        "fid,kid + fd_NAME,cos_NAME for every encoder, and morphology",
    )
    p.add_argument(
        "--encoders", help="comma-separated encoder names (default: uni2 and every --encoder NAME)"
    )
    p.add_argument(
        "--encoder",
        action="append",
        default=[],
        metavar="NAME=SOURCE[,opt=value]",
        help="define or override an encoder (repeatable)",
    )
    p.add_argument("--inception", help="local inception-2015-12-05.pt (or its folder); env PIXCELL_INCEPTION")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument(
        "--dtype", default="fp32", choices=list(DTYPES), help="pathology encoders' dtype (Inception: fp32)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding workers"
    )
    p.add_argument(
        "--cache-dir", help="feature cache (default: $PIXCELL_EVAL_CACHE or ~/.cache/pixcell/eval_features)"
    )
    p.add_argument("--cache", default="real", choices=CACHE_MODES, help="which folders' features to cache")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seeds KID's subset draws")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def encoder_specs(encoders: str | None, definitions: Sequence[str]) -> list[str]:
    """--encoders names + --encoder definitions -> the spec strings evaluate() takes."""
    defined = {}
    for text in definitions:
        defined[parse_encoder_spec(text).name] = text  # validates the spec early
    if encoders is None:
        names = list(dict.fromkeys(["uni2", *defined]))
    else:
        names = [n.strip() for n in encoders.split(",") if n.strip()]
    return [defined.get(n, n) for n in names]


def default_metrics(args: argparse.Namespace, specs: list[str]) -> list[str]:
    """Without --metrics: the encoder-free morphology distance alone when no weights were named (no --encoder,
    --encoders, --inception or $PIXCELL_INCEPTION), so the tool runs at a site without UNI2-h or Inception;
    else every encoder's default metrics and morphology."""
    if not (args.encoder or args.encoders or args.inception or os.environ.get("PIXCELL_INCEPTION")):
        return [MORPHOLOGY]
    return [*resolve_plan(None, specs)[0], MORPHOLOGY]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 with `error: ...` on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        check_numeric_args(args)
        specs = encoder_specs(args.encoders, args.encoder)
        if args.metrics:
            metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        else:
            metrics = default_metrics(args, specs)
        report = evaluate(
            args.real,
            args.syn,
            out=args.out,
            metrics=metrics,
            encoders=specs,
            inception=args.inception,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            cache_dir=args.cache_dir,
            cache=args.cache,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except USER_ERRORS as err:  # an unwritable --out or --cache-dir is an OSError: one line too
        print(error_line(err), file=sys.stderr)
        return 2
    for name, value in report["metrics"].items():
        print(f"{name:>16s}  {value:.6g}")
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
