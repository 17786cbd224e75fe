"""Pack existing per-patch `.npy` features (ours or the original code's) into HDF5 shards.

    python -m tools.pack_features --root patches                                   # npy beside the patches
    python -m tools.pack_features --root data/patches --features-root data/features   # the original code's layout
    python -m tools.pack_features --root patches --shard 2/16                      # job 2 of 16

Writes `<packed-root>/<key>/<shard:06d>.h5` + `meta.json` (see diffusion/data/features.py), one shard per
--shard-size consecutive index entries. A missing or malformed `.npy` pair (or NaNs) is logged, appended to the
failure log and counted; its row is marked invalid (the datasets skip it), and the run stops once failures pass
--max-failure-rate. Resumable: shards already written are skipped.
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
    DEFAULT_SHARD_SIZE,
    PACKED_DIRNAME,
    PackedShardWriter,
    SampleError,
    load_npy,
    npy_feature_paths,
    npy_feature_shapes,
    packed_shard_path,
    parse_shard,
    recorded_latent_norm,
    work_units,
    write_packed_meta,
)
from diffusion.data.index import default_index_file, key_size, read_index
from diffusion.geometry import norm_record
from tools.cli import add_failure_args, add_index_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_index_args(p, "pack")
    p.add_argument(
        "--features-root", type=Path, default=None, help="where the .npy files are (default: --root)"
    )
    p.add_argument("--packed-root", type=Path, default=None, help=f"output (default <root>/{PACKED_DIRNAME})")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    p.add_argument("--shard", default="0/1", help="this job's part, i/n")
    add_failure_args(p, "<packed-root>/pack_failures.<i>of<n>.tsv")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    npy_root = args.features_root or args.root
    packed_root = args.packed_root or args.root / PACKED_DIRNAME
    try:
        job = parse_shard(args.shard)
        index = read_index(args.index or default_index_file(args.root), args.keys)
        shapes = {}
        recorded, _ = recorded_latent_norm(npy_root, "npy")
        norm = norm_record(*recorded) if recorded is not None else {}  # carried over to the packed features
        for key, names in index.items():
            if names:
                shapes[key] = npy_feature_shapes(npy_root, names, key_size(key))
                write_packed_meta(
                    packed_root,
                    key,
                    len(names),
                    args.shard_size,
                    *shapes[key],
                    extra={"packed_from": str(npy_root), **norm},
                )
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(error_line(err), file=sys.stderr)
        return 2
    failure_log = args.failure_log or packed_root / f"pack_failures.{job[0]}of{job[1]}.tsv"
    counter = FailureCounter(args.max_failure_rate, args.min_failures_before_stop, failure_log)
    units = work_units({k: len(v) for k, v in index.items()}, args.shard_size, job)
    packed = 0
    try:
        for unit in tqdm(units, desc=f"packing {job[0]}/{job[1]}", unit="shard"):
            target = packed_shard_path(packed_root, unit.key, unit.shard)
            if target.is_file():
                continue
            names = index[unit.key][unit.start : unit.stop]
            vae_shape, uni_shape = shapes[unit.key]
            with PackedShardWriter(target, names, vae_shape, uni_shape) as writer:
                for row, name in enumerate(names):
                    vae_path, uni_path = npy_feature_paths(npy_root, name)
                    try:
                        vae = load_npy(vae_path, vae_shape)
                        uni = load_npy(uni_path)
                        if uni.size != int(np.prod(uni_shape)):
                            raise SampleError(f"{uni_path}: shape {tuple(uni.shape)}, expected {uni_shape}")
                        vae, uni = np.asarray(vae), np.asarray(uni).reshape(uni_shape)
                        if not (np.isfinite(vae).all() and np.isfinite(uni).all()):
                            raise SampleError(f"{name}: NaN or Inf in its features")
                    except SampleError as err:
                        counter.failure(name, str(err))
                        continue
                    writer.write(row, vae, uni)
                    counter.success()
                    packed += 1
    except RuntimeError as err:
        print(f"error: {err} (list in {failure_log})", file=sys.stderr)
        return 2
    print(f"{packed} patches packed, {counter.failed} invalid (job {job[0]}/{job[1]}) -> {packed_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
