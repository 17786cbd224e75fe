"""UNI2-h embeddings of a paired H&E / IHC dataset, computed once and cached in one safetensors file.

    he   (N, T, C) float16   tokens of the H&E images (T = 16 for 1024 px: one per 256 px tile, row-major)
    ihc  (N, T, C) float16   tokens of the IHC images
    metadata: names (JSON list, the pair file names in order), encoder, image_size

    python -m virtual_staining.embeddings --dataset MIST --root /data/MIST --stain HER2 --split train \\
        --out work_dirs/mist_her2/embeddings_train.safetensors --uni /weights/uni2h/pytorch_model.bin

Both trainers read this file (and write it on first use when it is missing): the flow MLP learns he -> ihc, the LoRA is conditioned on ihc. The tokens come
from `diffusion.encoders.UNIEncoder.embed_grid` (the same preprocessing as every other PixCell feature).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffusion.atomic import atomic_path
from diffusion.encoders import UNI2H_HUB_ID, UNIEncoder, load_uni
from diffusion.geometry import UNI_TILE

from .data import Pair, read_image

log = logging.getLogger(__name__)


@dataclass
class EmbeddingCache:
    """Cached tokens of a paired dataset; row i of `he` and `ihc` belongs to `names[i]`."""

    names: list[str]
    he: Tensor  # (N, T, C)
    ihc: Tensor  # (N, T, C)
    meta: dict

    def __len__(self) -> int:
        return len(self.names)

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


class _PairReader(Dataset):
    """Reads both images of a pair; an unreadable pair comes back as its error message (skipped by the loop)."""

    def __init__(self, pairs: list[Pair], size: int):
        self.pairs, self.size = pairs, size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        p = self.pairs[i]
        try:
            return i, read_image(p.he, self.size), read_image(p.ihc, self.size)
        except (ValueError, FileNotFoundError) as err:
            return i, str(err), None


def _collate(items):
    return items


@torch.no_grad()
def compute_embeddings(
    pairs: list[Pair],
    uni: UNIEncoder,
    out_path: str | Path,
    image_size: int = 1024,
    batch_size: int = 4,
    num_workers: int = 2,
    max_failure_rate: float = 0.01,
    encoder_name: str = "",
    progress: bool = True,
) -> Path:
    """Embed every pair with `uni.embed_grid` and write the cache (atomically).

    Unreadable or wrongly sized images are skipped with a logged running count; past
    `max_failure_rate * len(pairs)` skips the run stops with a ValueError (nothing is written).
    """
    if image_size % UNI_TILE:
        raise ValueError(
            f"image_size {image_size}: expected a multiple of {UNI_TILE} (one UNI token per {UNI_TILE} px tile)"
        )
    loader = DataLoader(
        _PairReader(pairs, image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    allowed = int(max_failure_rate * len(pairs))
    device = next(uni.parameters()).device
    keep: list[int] = []
    he_out, ihc_out = [], []
    skipped = 0
    for items in tqdm(loader, desc="UNI embeddings", disable=not progress, unit="batch"):
        good = [(i, he, ihc) for i, he, ihc in items if ihc is not None]
        for i, err, _ in (it for it in items if it[2] is None):
            skipped += 1
            log.warning("skipped pair %s (%d skipped so far): %s", pairs[i].name, skipped, err)
            if skipped > allowed:
                raise ValueError(
                    f"{skipped} unreadable pairs, more than max_failure_rate={max_failure_rate} of "
                    f"{len(pairs)}; last: {err}"
                )
        if not good:
            continue
        he = torch.stack([g[1] for g in good]).to(device)
        ihc = torch.stack([g[2] for g in good]).to(device)
        tokens = uni.embed_grid(torch.cat([he, ihc]))  # (2B, T, C)
        he_out.append(tokens[: len(good)].half().cpu())
        ihc_out.append(tokens[len(good) :].half().cpu())
        keep.extend(g[0] for g in good)
    if not keep:
        raise ValueError("no pair could be read")
    state = {"he": torch.cat(he_out).contiguous(), "ihc": torch.cat(ihc_out).contiguous()}
    meta = {
        "format": "pixcell-vs-embeddings",
        "names": json.dumps([pairs[i].name for i in keep]),
        "encoder": encoder_name,
        "image_size": str(image_size),
        "skipped": str(skipped),
    }
    from safetensors.torch import save_file

    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    log.info(
        "wrote %s: %d pairs, tokens %s (%d skipped)", out_path, len(keep), tuple(state["he"].shape), skipped
    )
    return Path(out_path)


def load_embeddings(path: str | Path) -> EmbeddingCache:
    """Read a cache written by `compute_embeddings`; one-line errors for a missing or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding cache {path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "pixcell-vs-embeddings":
                raise ValueError("not written by virtual_staining.embeddings")
            he, ihc = f.get_tensor("he"), f.get_tensor("ihc")
    except Exception as err:
        raise ValueError(f"embedding cache {path}: cannot read it ({err})") from None
    names = json.loads(meta["names"])
    if he.shape != ihc.shape or he.shape[0] != len(names) or he.ndim != 3:
        raise ValueError(
            f"embedding cache {path}: inconsistent shapes he {tuple(he.shape)}, ihc {tuple(ihc.shape)}"
        )
    return EmbeddingCache(names=names, he=he, ihc=ihc, meta=meta)


def ensure_embeddings(
    pairs: list[Pair],
    uni_source: str | Path,
    out_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> EmbeddingCache:
    """Load the cache if it covers exactly these pairs (same names); otherwise compute it with UNI from `uni_source`."""
    out_path = Path(out_path)
    want = [p.name for p in pairs]
    if out_path.is_file():
        cache = load_embeddings(out_path)
        skipped = int(cache.meta.get("skipped", 0))
        # The same pairs, less any that were skipped as unreadable when the cache was written.
        if set(cache.names) <= set(want) and len(cache) + skipped == len(want):
            log.info("using cached embeddings %s (%d pairs)", out_path, len(cache))
            return cache
        log.info("%s: covers other pairs than this split; recomputing", out_path)
    uni = load_uni(uni_source, device=device).to(dtype)
    compute_embeddings(pairs, uni, out_path, encoder_name=str(uni_source), **kwargs)
    return load_embeddings(out_path)


def main(argv=None) -> int:
    import argparse

    from diffusion.geometry import DTYPES
    from tools.cli import resolve_device

    from .data import DATASETS, MIST_STAINS, dataset_pairs

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
    import sys

    from tools.cli import run_cli

    sys.exit(run_cli(main))
