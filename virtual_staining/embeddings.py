"""Compute the UNI2-h token cache of a paired H&E / IHC split ahead of training (`diffusion.data.ihc_tokens`).

    python -m virtual_staining.embeddings --dataset MIST --root /data/MIST --stain HER2 --split train \\
        --out work_dirs/mist_her2/embeddings_train.safetensors --uni /weights/uni2h/pytorch_model.bin

Both staining trainers also write this cache on first use; this command makes it once for several runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from diffusion.command import resolve_device, run_cli
from diffusion.data.ihc_pairs import DATASETS, MIST_STAINS, dataset_pairs
from diffusion.data.ihc_tokens import compute_embeddings, load_embeddings
from diffusion.encoders import UNI2H_HUB_ID, load_uni
from diffusion.geometry import DTYPES


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m virtual_staining.embeddings", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", required=True, help="dataset root folder")
    p.add_argument("--stain", default="HER2", choices=MIST_STAINS)
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="cache file (.safetensors)")
    p.add_argument("--uni", default=UNI2H_HUB_ID, help="UNI2-h: hub id, local folder or weights file")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="image pairs per batch")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    p.add_argument("--skip-unpaired", action="store_true", help="leave out images without a partner")
    args = p.parse_args(argv)
    pairs = dataset_pairs(
        args.dataset, args.root, args.split, args.stain, "skip" if args.skip_unpaired else "error"
    )
    uni = load_uni(args.uni, device=resolve_device(args.device)).to(DTYPES[args.dtype])
    compute_embeddings(
        pairs,
        uni,
        args.out,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        encoder_name=str(args.uni),
    )
    print(f"wrote {args.out} ({len(load_embeddings(args.out))} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
