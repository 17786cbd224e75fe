"""Pack the index and per-patch features into streaming parquet shards (diffusion/data/shards.py).

    python -m tools.pack_shards --root patches                                      # npy beside the patches
    python -m tools.pack_shards --root patches --format packed                      # from the HDF5 packed features
    python -m tools.pack_shards --root data/patches --features-root data/features --out /scratch/shards

Writes `<out>/shard-<i>.parquet` (--shard-size patches each, in row groups of --row-group-size: the unit the
trainer's readers split over nodes, processes and loader workers) and `<out>/shards.json` last. Train on them
with `--cfg-options data.feature_format='shards'` (data.features_root = <out>, default <root>/features_shards).
Patches of all selected keys go into one set of shards (one parent size). A missing or malformed feature pair is
logged, appended to the failure log and left out; the run stops once failures pass --max-failure-rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffusion.command import error_line
from diffusion.data.failures import FailureCounter
from diffusion.data.features import (
    PACKED_DIRNAME,
    PackedReader,
    SampleError,
    load_npy,
    npy_feature_paths,
    npy_feature_shapes,
    recorded_latent_norm,
)
from diffusion.data.index import default_index_file, key_size, read_index
from diffusion.data.shards import SHARDS_DIRNAME, ShardWriter
from diffusion.geometry import norm_record
from tools.cli import add_failure_args, add_index_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_index_args(p, "pack")
    p.add_argument("--format", choices=("npy", "packed"), default="npy", help="the features to read")
    p.add_argument(
        "--features-root",
        type=Path,
        default=None,
        help=f"where they are (default: --root for npy, <root>/{PACKED_DIRNAME} for packed)",
    )
    p.add_argument("--out", type=Path, default=None, help=f"shards folder (default <root>/{SHARDS_DIRNAME})")
    p.add_argument("--shard-size", type=int, default=4096, help="patches per parquet file")
    p.add_argument("--row-group-size", type=int, default=64, help="patches per row group (unit of reading)")
    add_failure_args(p, "<out>/pack_failures.tsv")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    features = args.features_root or (args.root if args.format == "npy" else args.root / PACKED_DIRNAME)
    out = args.out or args.root / SHARDS_DIRNAME
    try:
        index = read_index(args.index or default_index_file(args.root), args.keys)
        sizes = {key_size(k) for k, names in index.items() if names}
        if len(sizes) != 1:
            raise ValueError(
                f"index keys of {len(sizes)} patch sizes {sorted(sizes)}: pack one size (--keys)"
            )
        size = sizes.pop()
        key, names = next((k, v) for k, v in index.items() if v)
        if args.format == "npy":
            vae_shape, uni_shape = npy_feature_shapes(features, names, size)
        else:
            meta = PackedReader(features, key, len(names)).meta
            vae_shape, uni_shape = tuple(meta["vae_shape"]), tuple(meta["uni_shape"])
        recorded, _ = recorded_latent_norm(features, args.format)
        extra = {"packed_from": str(features), **(norm_record(*recorded) if recorded is not None else {})}
        writer = ShardWriter(out, vae_shape, uni_shape, size, args.shard_size, args.row_group_size, extra)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(error_line(err), file=sys.stderr)
        return 2
    counter = FailureCounter(
        args.max_failure_rate, args.min_failures_before_stop, args.failure_log or out / "pack_failures.tsv"
    )
    try:
        for key, names in index.items():
            reader = PackedReader(features, key, len(names)) if args.format == "packed" and names else None
            for position, name in enumerate(tqdm(names, desc=f"packing {key}", unit="patch")):
                try:
                    if reader is not None:
                        vae, uni = reader.read(position, name)
                    else:
                        vae_path, uni_path = npy_feature_paths(features, name)
                        vae, uni = load_npy(vae_path, vae_shape), load_npy(uni_path)
                        if uni.size != int(np.prod(uni_shape)):
                            raise SampleError(f"{uni_path}: shape {tuple(uni.shape)}, expected {uni_shape}")
                    vae, uni = np.asarray(vae), np.asarray(uni).reshape(uni_shape)
                    if not (np.isfinite(vae).all() and np.isfinite(uni).all()):
                        raise SampleError(f"{name}: NaN or Inf in its features")
                except SampleError as err:
                    counter.failure(name, str(err))
                    continue
                writer.add(key, name, vae, uni)
                counter.success()
        meta = writer.close()
    except RuntimeError as err:
        print(f"error: {err} (list in {counter.log_file})", file=sys.stderr)
        return 2
    print(
        f"{counter.ok} patches packed into {len(writer.shards)} shard(s), {counter.failed} left out -> {meta}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
