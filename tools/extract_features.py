"""Extract the training features of every indexed patch: SD3.5-VAE posterior and UNI2-h tile embeddings.

    python -m tools.extract_features --root patches                                # npy beside the patches
    python -m tools.extract_features --root patches --format packed --shard 3/8    # job 3 of 8, HDF5 shards
    python -m tools.extract_features --root patches --format npy packed            # both from one encoder pass

Per patch of S px: `<patch>_sd3_vae.npy` float16 (32, S/8, S/8) = posterior mean and std stacked on channels, and
`<patch>_uni.npy` float16 ((S/256)^2, 1536) = UNI2-h embeddings of the 256 px tiles, row-major (the published
layout), and/or packed shards (see diffusion/data/features.py). Encoders come from the Hub ids by default
(`--vae`, `--uni` take a hub id or a local folder/file). GPU with autocast when available, CPU otherwise.

Sharding: the index is cut into units of --shard-size consecutive patches; job i of n (--shard i/n) takes every
n-th unit. Resumable: run the same command again; finished shards and finished patches are skipped.
An image that cannot be read (truncated, wrong size) is logged, appended to the failure log and counted; it gets
no features (npy) or an invalid row (packed), and the run stops once failures pass --max-failure-rate.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffusion.command import run_cli
from diffusion.data.failures import FailureCounter
from diffusion.data.features import (
    DEFAULT_SHARD_SIZE,
    PACKED_DIRNAME,
    PackedShardWriter,
    npy_feature_paths,
    packed_shard_path,
    parse_shard,
    save_npy,
    work_units,
    write_npy_meta,
    write_packed_meta,
)
from diffusion.data.index import default_index_file, key_size, read_index
from diffusion.encoders import (
    SD35_VAE_ID,
    UNI2H_HUB_ID,
    UNIEncoder,
    encode_posterior,
    load_uni,
    load_vae,
    vae_scale_factor,
)
from diffusion.geometry import UNI_TILE, latent_norm, norm_record
from tools.cli import add_failure_args, add_index_args

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

log = logging.getLogger("pixcell.data")


class PatchImages(Dataset):
    """(position, uint8 CHW tensor or None, error) for the listed patches; decoding happens in loader workers."""

    def __init__(self, root: Path, names: list[str], positions: list[int], size: int):
        self.root, self.names, self.positions, self.size = root, names, positions, size

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        path = self.root / self.names[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")  # forces the full decode: a truncated file raises here
            if im.size != (self.size, self.size):
                raise ValueError(f"image is {im.size[0]}x{im.size[1]}, expected {self.size}x{self.size}")
            array = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
            return self.positions[i], array, None
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for broken files
            return self.positions[i], None, f"{type(err).__name__}: {err}"


def _collate(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> list[tuple[int, torch.Tensor | None, str | None]]:
    return items


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """auto: bf16 autocast on GPU (the encoders are frozen; bf16 halves memory and time), fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def encode(
    vae: AutoencoderKL, uni: UNIEncoder, images: torch.Tensor, amp: AbstractContextManager
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B, 3, S, S) -> vae float16 (B, 2k, S/8, S/8) [mean | std], uni float16 (B, (S/256)^2, C)."""
    x = images.float() / 255.0
    with amp:
        mean, std = encode_posterior(vae, x)
        tokens = uni.embed_grid(x)
    vae_feats = torch.cat([mean.float(), std.float()], dim=1).cpu().numpy().astype(np.float16)
    return vae_feats, tokens.float().cpu().numpy().astype(np.float16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_index_args(p, "process")
    p.add_argument("--format", nargs="+", choices=["npy", "packed"], default=["npy"], help="output format(s)")
    p.add_argument(
        "--features-root", type=Path, default=None, help="npy output root (default: --root, beside patches)"
    )
    p.add_argument(
        "--packed-root", type=Path, default=None, help=f"packed output root (default <root>/{PACKED_DIRNAME})"
    )
    p.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="patches per unit / packed shard"
    )
    p.add_argument("--shard", default="0/1", help="this job's part, i/n")
    p.add_argument("--vae", default=SD35_VAE_ID, help="VAE hub id or local diffusers folder")
    p.add_argument("--uni", default=UNI2H_HUB_ID, help="UNI hub id (hf-hub:...) or local folder/weights file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=4, help="image decoding processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    add_failure_args(p, "<output root>/feature_failures.<i>of<n>.tsv")
    return p


def main(argv: list[str] | None = None) -> int:
    """Bad input, an unwritable or full output: one `error:` line, exit status 2."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    job = parse_shard(args.shard)
    index = read_index(args.index or default_index_file(args.root), args.keys)
    sizes = {key: key_size(key) for key in index}
    for key, size in sizes.items():
        if size % UNI_TILE:
            raise ValueError(
                f"index key {key}: patch size {size} is not a multiple of {UNI_TILE} (one UNI token per tile)"
            )
    if args.batch_size < 1 or args.num_workers < 0:
        raise ValueError("--batch-size must be >= 1 and --num-workers >= 0")
    device = pick_device(args.device)
    vae = load_vae(args.vae).to(device)
    uni = load_uni(args.uni, device=device)
    npy_root = args.features_root or args.root
    packed_root = args.packed_root or args.root / PACKED_DIRNAME
    want_npy, want_packed = "npy" in args.format, "packed" in args.format
    out_root = packed_root if want_packed else npy_root
    failure_log = args.failure_log or out_root / f"feature_failures.{job[0]}of{job[1]}.tsv"
    counter = FailureCounter(args.max_failure_rate, args.min_failures_before_stop, failure_log)
    amp = autocast_for(device, args.precision)
    factor, latent_ch = vae_scale_factor(vae), 2 * vae.config.latent_channels
    norm = norm_record(
        *latent_norm(vae)
    )  # recorded beside the features: the trainer checks its config against it
    if want_npy:
        write_npy_meta(npy_root, {"vae": str(args.vae), "uni": str(args.uni), **norm})
    for key, names in index.items() if want_packed else ():
        s = sizes[key]
        write_packed_meta(
            packed_root,
            key,
            len(names),
            args.shard_size,
            (latent_ch, s // factor, s // factor),
            ((s // UNI_TILE) ** 2, uni.embed_dim),
            extra={"vae": str(args.vae), "uni": str(args.uni), **norm},
        )

    units = work_units({k: len(v) for k, v in index.items()}, args.shard_size, job)
    written = 0
    bar = tqdm(units, desc=f"feature shards {job[0]}/{job[1]}", unit="shard")
    try:
        for unit in bar:
            names = index[unit.key][unit.start : unit.stop]
            shard_file = packed_shard_path(packed_root, unit.key, unit.shard)
            packed_todo = want_packed and not shard_file.is_file()
            # Batches have fixed boundaries inside a unit, and a batch with any missing output is encoded whole:
            # convolution results depend (in the last float16 bit) on the batch they ran in, so a resumed run
            # must see the same batches as an uninterrupted one to write the same bytes.
            batches = [
                list(range(b, min(b + args.batch_size, len(names))))
                for b in range(0, len(names), args.batch_size)
            ]
            if not packed_todo:
                batches = [
                    b
                    for b in batches
                    if want_npy
                    and not all(p.is_file() for i in b for p in npy_feature_paths(npy_root, names[i]))
                ]
            if not batches:
                continue
            s = sizes[unit.key]
            writer = None
            if packed_todo:
                writer = PackedShardWriter(
                    shard_file,
                    names,
                    (latent_ch, s // factor, s // factor),
                    ((s // UNI_TILE) ** 2, uni.embed_dim),
                )
            with writer if writer is not None else nullcontext():
                images = PatchImages(args.root, names, list(range(len(names))), s)
                loader = DataLoader(
                    images, batch_sampler=batches, num_workers=args.num_workers, collate_fn=_collate
                )
                for batch in loader:
                    good = [(pos, img) for pos, img, err in batch if err is None]
                    for pos, _, err in batch:
                        if err is not None:
                            counter.failure(names[pos], err)
                    if not good:
                        continue
                    vae_feats, uni_feats = encode(
                        vae, uni, torch.stack([img for _, img in good]).to(device), amp
                    )
                    for (pos, _), v, u in zip(good, vae_feats, uni_feats):
                        if want_npy:
                            vae_path, uni_path = npy_feature_paths(npy_root, names[pos])
                            if not (vae_path.is_file() and uni_path.is_file()):
                                save_npy(vae_path, v)
                                save_npy(uni_path, u)
                        if writer is not None:
                            writer.write(pos, v, u)
                    counter.success(len(good))
                    written += len(good)
                    bar.set_postfix(patches=written, failed=counter.failed)
    except RuntimeError as err:  # the failure threshold
        bar.close()
        print(f"error: {err} (list in {failure_log})", file=sys.stderr)
        return 2
    finally:
        bar.close()  # before any error line (a full or read-only disk: run_cli's)
    print(f"{written} patches encoded, {counter.failed} failed (job {job[0]}/{job[1]}, {len(units)} units)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
