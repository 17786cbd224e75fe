"""Training-dataloader throughput of the three feature formats, and their footprint on disk.

    python benchmarks/bench_data.py                      # 256 parents of 1024 px, warm and cold page cache
    python benchmarks/bench_data.py --patches 1024 --num-workers 8 --work-dir /scratch/bench

Synthetic features with the published shapes and dtypes (vae float16 (32, 128, 128), uni float16 (16, 1536) per
1024 px patch) are written once in both formats; then a shuffled DataLoader over `PatchFeatureDataset` (the one the
trainer uses) is timed at each resolution; the parquet shards (tools/pack_shards.py) are read by `ShardStream`,
the trainer's streaming reader (row groups split over the workers, shuffle buffer of 1024 crops). "per worker"
is the warm rate divided by the loader workers. "cold" evicts the feature files from the page cache before the run
(posix_fadvise DONTNEED: only these files, no root needed), which is what the first epoch over a 35 TB dataset sees.
Prints one table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from diffusion.data.datasets import PatchFeatureDataset, collate_skip_none
from diffusion.data.features import (
    PackedShardWriter,
    npy_feature_paths,
    packed_shard_path,
    save_npy,
    work_units,
    write_packed_meta,
)
from diffusion.data.index import write_index
from diffusion.data.shards import ShardStream, ShardWriter

KEY = "bench_1024"
VAE_SHAPE, UNI_SHAPE = (32, 128, 128), (16, 1536)


def make_data(root: Path, n: int, shard_size: int, row_group_size: int = 16) -> list[str]:
    names = [f"bench/g/single_1024/slide{i // 100:04d}/{(i % 100) // 10}_{i % 10}.png" for i in range(n)]
    write_index(root / "metadata/patch_names_all.hdf5", {KEY: names})
    rng = np.random.default_rng(0)
    features = []
    for name in names:
        mean = rng.standard_normal((16, 128, 128), dtype=np.float32)
        std = rng.uniform(0.01, 0.2, (16, 128, 128)).astype(np.float32)
        vae = np.concatenate([mean, std]).astype(np.float16)
        uni = rng.standard_normal(UNI_SHAPE, dtype=np.float32).astype(np.float16)
        vae_path, uni_path = npy_feature_paths(root, name)
        save_npy(vae_path, vae)
        save_npy(uni_path, uni)
        features.append((vae, uni))
    packed = root / "features_packed"
    write_packed_meta(packed, KEY, n, shard_size, VAE_SHAPE, UNI_SHAPE)
    for unit in work_units({KEY: n}, shard_size):
        rows = names[unit.start : unit.stop]
        with PackedShardWriter(packed_shard_path(packed, KEY, unit.shard), rows, VAE_SHAPE, UNI_SHAPE) as w:
            for r in range(len(rows)):
                w.write(r, *features[unit.start + r])
    shards = ShardWriter(root / "features_shards", VAE_SHAPE, UNI_SHAPE, 1024, shard_size, row_group_size)
    for name, (vae, uni) in zip(names, features):
        shards.add(KEY, name, vae, uni)
    shards.close()
    return names


def feature_files(root: Path, fmt: str) -> list[Path]:
    if fmt == "npy":
        return sorted(root.joinpath("bench").rglob("*.npy"))
    if fmt == "shards":
        return sorted(root.joinpath("features_shards").glob("*.*"))
    return sorted(root.joinpath("features_packed").rglob("*.*"))


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(root: Path, fmt: str, resolution: int, args: argparse.Namespace, cold: bool) -> float:
    if fmt == "shards":
        stream = ShardStream(
            root / "features_shards", resolution, args.batch_size, num_workers=args.num_workers
        )
        stream.set_position(0, 0)
        loader = DataLoader(stream, batch_size=args.batch_size, num_workers=args.num_workers)
        return _rate(loader, min(args.samples, stream.batches_per_epoch * args.batch_size), root, fmt, cold)
    ds = PatchFeatureDataset(root, resolution=resolution, parent_size=1024, feature_format=fmt, seed=0)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        generator=gen,
        num_workers=args.num_workers,
        collate_fn=collate_skip_none,
        persistent_workers=False,
    )
    return _rate(loader, min(args.samples, len(ds)), root, fmt, cold)


def _rate(loader: DataLoader, limit: int, root: Path, fmt: str, cold: bool) -> float:
    if cold:
        evict(feature_files(root, fmt))
    seen = 0
    t0 = time.perf_counter()
    for batch in loader:
        seen += batch["latent"].shape[0]
        if seen >= limit:
            break
    return seen / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patches", type=int, default=256, help="1024 px parent patches to synthesise")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--samples", type=int, default=2048, help="samples timed per row (at most one epoch)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument(
        "--work-dir", type=Path, default=None, help="where to write the data (default: a temp dir)"
    )
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = Path(tmp) / "patches"
        t0 = time.perf_counter()
        make_data(root, args.patches, args.shard_size)
        print(f"wrote {args.patches} patches x 3 formats in {time.perf_counter() - t0:.1f} s under {root}")
        print(
            f"batch {args.batch_size}, {args.num_workers} workers, shuffled, torch {torch.__version__}, "
            f"{os.cpu_count()} CPUs\n"
        )
        print(
            "| format | files / 1000 patches | GB / 1000 patches | resolution | warm samples/s | per worker | cold samples/s |"
        )
        print("|---|---|---|---|---|---|---|")
        for fmt in ("npy", "packed", "shards"):
            files = feature_files(root, fmt)
            size = sum(f.stat().st_size for f in files)
            if fmt == "npy":
                per_k_files = 2000
            else:  # files of shard_size patches plus one meta / index file
                per_k_files = int(np.ceil(1000 / args.shard_size)) + 1
            per_k_bytes = size / args.patches * 1000
            for res in args.resolutions:
                cold = measure(root, fmt, res, args, cold=True)
                warm = measure(root, fmt, res, args, cold=False)
                print(
                    f"| {fmt} | {per_k_files} | {per_k_bytes / 1e9:.2f} | {res} | {warm:,.0f} | "
                    f"{warm / max(1, args.num_workers):,.0f} | {cold:,.0f} |"
                )
        n30 = 30_800_000
        print(
            f"\nat the published 30.8M patches: npy {2 * n30 / 1e6:.1f}M files, "
            f"packed {int(np.ceil(n30 / args.shard_size)):,} shard files"
        )


if __name__ == "__main__":
    main()
