"""Memorisation audit before sharing synthetic images: is any of them a copy of a training image?

    python -m tools.audit --train TRAIN --synthetic SYN --reference HELDOUT --out audit \\
        --encoder uni2=/weights/uni2h/pytorch_model.bin [--encoder hoptimus0=/weights/H-optimus-0] [--fail-on-copies]
    # TRAIN as the dataset index (every patch, cut into crops of the synthetic images' size) -> also slide level
    python -m tools.audit --train patches/metadata/patch_names_all.hdf5 --train-keys tcga_1024 \\
        --synthetic runs/s256/syn --reference runs/heldout/real --out audit

For every synthetic image: its nearest training images in each encoder's space (faiss at scale), a pixel-space
comparison with those candidates that sees through flips, 90-degree rotations, JPEG, shifts up to 16 px and
slight re-colouring, and a verdict. Held-out real images (same slides, never trained on) are the yardstick.
Writes OUT/audit.json (per_image: name relative to SYN, nearest_train, scores, flagged, reason; summary),
OUT/report.md and OUT/report.png. --fail-on-copies: exit status 1 when any image is flagged (release
checklists). See docs/applications.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from diffusion.atomic import atomic_path, atomic_write_bytes
from diffusion.audit.audit import AuditSettings, audit
from diffusion.audit.images import ImageSet, from_folder, from_index, is_index
from diffusion.audit.report import report_figure, report_markdown
from diffusion.audit.search import BACKENDS
from diffusion.command import resolve_device, run_cli
from diffusion.metrics.cache import open_feature_cache
from diffusion.metrics.encoders import load_feature_encoder, parse_encoder_spec
from diffusion.writable import check_writable
from tools.cli import DTYPES, add_feature_args, check_numeric_args


def image_set(
    path: str, flag: str, size: int, keys: Sequence[str] | None, data_root: str | None, progress: bool
) -> ImageSet:
    """A folder, or a dataset index cut into `size` px crops."""
    if is_index(path):
        return from_index(path, flag, size, keys, data_root)
    if keys:
        raise ValueError(f"{flag}-keys: {flag} {path} is a folder, not a dataset index")
    return from_folder(path, flag, progress)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="training images: a folder, or the dataset index (.hdf5)")
    p.add_argument("--train-keys", nargs="+", help="index datasets to audit against (default: all)")
    p.add_argument("--synthetic", required=True, help="folder of synthetic images (a sampling run's syn/)")
    p.add_argument("--reference", help="held-out real images (folder or index): the yardstick")
    p.add_argument("--reference-keys", nargs="+", help="index datasets of the held-out images")
    p.add_argument("--data-root", help="patches folder of an index (default: the index's root)")
    p.add_argument("--out", required=True, help="report folder: audit.json, report.md, report.png")
    p.add_argument(
        "--encoder",
        action="append",
        default=[],
        metavar="NAME=SOURCE[,opt=value]",
        help="encoder(s) for candidates (repeatable; default uni2), as in tools/evaluate.py",
    )
    p.add_argument("--k", type=int, default=3, help="candidates per image and encoder for the pixel check")
    p.add_argument(
        "--pixel-threshold", type=float, default=0.8, help="NCC at or above which an image is a copy"
    )
    p.add_argument("--max-shift", type=int, default=16, help="px (at 256 px) the pixel check searches")
    p.add_argument("--search", default="auto", choices=BACKENDS, help="feature search backend")
    p.add_argument("--fail-on-copies", action="store_true", help="exit status 1 when any image is flagged")
    add_feature_args(p)
    args = p.parse_args(argv)
    check_numeric_args(args)  # before any encoder loads: ranges, and where the report goes
    check_writable(args.out, "--out")

    if args.k < 1 or not 0 < args.pixel_threshold <= 1:
        raise ValueError(
            f"--k {args.k} / --pixel-threshold {args.pixel_threshold}: expected >= 1 / in (0, 1]"
        )
    specs = [parse_encoder_spec(e) for e in (args.encoder or ["uni2"])]
    progress = not args.no_progress
    synthetic = from_folder(args.synthetic, "--synthetic", progress)
    with Image.open(synthetic.files[0]) as im:
        size = im.width  # index patches are cut into crops of the synthetic images' size
    train = image_set(args.train, "--train", size, args.train_keys, args.data_root, progress)
    reference = None
    if args.reference:
        reference = image_set(
            args.reference, "--reference", size, args.reference_keys, args.data_root, progress
        )
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    loaders = [lambda spec=spec: load_feature_encoder(spec, device, dtype) for spec in specs]
    settings = AuditSettings(
        k=args.k, pixel_threshold=args.pixel_threshold, max_shift=args.max_shift, backend=args.search
    )
    cache = open_feature_cache(args.cache_dir, not args.no_cache)
    result = audit(
        train, synthetic, reference, loaders, settings, cache, args.batch_size, args.num_workers, progress
    )
    result["summary"]["inputs"] = {
        "train": args.train,
        "synthetic": args.synthetic,
        "reference": args.reference,
    }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "audit.json", json.dumps(result, indent=1).encode())
    atomic_write_bytes(out / "report.md", report_markdown(result).encode())
    with atomic_path(out / "report.png") as tmp:
        report_figure(result, train, synthetic, tmp)
    s = result["summary"]
    print(
        f"{s['flagged']} of {s['n_synthetic']} synthetic images flagged as copies, {s['suspect']} suspect; "
        f"report: {out / 'report.md'}"
    )
    for w in s["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 1 if args.fail_on_copies and s["flagged"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
