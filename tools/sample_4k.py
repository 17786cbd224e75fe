"""Generate large regions (4096 x 4096 px, or any multiple of 1024) with PixCell-1024 by sliding windows.

    # conditioned on a real 4096 px region (tiled into 256 px tiles, UNI2-h on the fly; written to OUT/real too)
    python -m tools.sample_4k --image region.png --out runs/4k
    # on a stored embedding grid: .npy (64, 64, 1536) or (4096, 1536), or a .safetensors of grids
    python -m tools.sample_4k --grid grid.npy --out runs/4k
    # on 4 x 4 adjacent 1024 px dataset patches (and their stored features), top-left patch row 10, col 12
    python -m tools.sample_4k --data-root patches --region tcga/lihc/single_1024/TCGA-XX 10 12 --out runs/4k

Each 1024 px window is conditioned on its own 4 x 4 sub-grid of the region's UNI grid (with --image: on the UNI
embeddings of the reference crop under it, so windows may start anywhere; diffusion/sampling/dense_conditions.py), overlapping predictions
are averaged at every step (stride 32/64/128 latent px; see diffusion/sampling/large_image.py for the exact update), all
windows of a step, conditional and unconditional, run through the model in batched chunks, and the VAE decodes
overlapping windows blended with a Gaussian window. Rerunning the same command skips finished regions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from diffusion.command import check_paths, run_cli, runtime_device
from diffusion.geometry import tokens_side
from diffusion.sampling.conditions import RegionSource
from diffusion.sampling.loading import load_pipeline, load_uni_encoder
from diffusion.sampling.runner import RegionSettings, sample_regions
from tools.cli import (
    add_lora_args,
    add_model_args,
    add_output_args,
    add_runtime_args,
    add_sampler_args,
    pipeline_sources,
    sample_settings,
)

MODEL = "StonyBrook-CVLab/PixCell-1024"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, MODEL)
    add_lora_args(p)
    src = p.add_argument_group("regions (any mix; each is one output image)")
    src.add_argument("--image", nargs="+", default=[], help="large real images (side a multiple of 1024 px)")
    src.add_argument(
        "--grid", nargs="+", default=[], help=".npy / .safetensors UNI grids, (G, G, C) or (G*G, C)"
    )
    src.add_argument(
        "--region",
        nargs=3,
        action="append",
        default=[],
        metavar=("SLIDE_DIR", "ROW", "COL"),
        help="dataset region: slide folder relative to --data-root and its top-left patch row, col (repeatable)",
    )
    src.add_argument("--data-root", help="patches folder for --region")
    src.add_argument("--features-root", help="folder of <patch>_uni.npy (default: beside the patches)")
    src.add_argument("--region-size", type=int, default=4096, help="px, for --region (a multiple of 1024)")
    win = p.add_argument_group("windows")
    win.add_argument(
        "--stride",
        type=int,
        default=None,
        help="latent px between windows (default half a window: 64 for PixCell-1024). --image: any stride "
        "that steps edge to edge; --grid/--region: a multiple of one UNI tile (PixCell-1024: 32, 64 or 128)",
    )
    win.add_argument(
        "--decode-stride", type=int, default=None, help="latent px between decoded windows (half)"
    )
    win.add_argument("--sigma", type=float, default=0.3, help="Gaussian blending window (published: 0.8)")
    win.add_argument(
        "--window-batch", type=int, default=None, help="windows per forward (default: all on GPU)"
    )
    add_sampler_args(p)
    add_runtime_args(p)
    add_output_args(p)
    args = p.parse_args(argv)

    for flag in ("stride", "decode_stride", "window_batch", "vae_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: expected >= 1")
    if args.sigma <= 0:
        raise ValueError(f"--sigma {args.sigma}: expected > 0")
    check_paths(
        image=args.image, grid=args.grid, data_root=[args.data_root], features_root=[args.features_root]
    )
    device = runtime_device(args.device)
    pipe, model_ref, vae_ref = load_pipeline(pipeline_sources(args), device)
    t = pipe.transformer.config
    try:
        m = tokens_side(t.caption_num_tokens)
    except ValueError as err:
        raise ValueError(f"--model {args.model}: {err}") from None
    # With --image every window is conditioned on the reference crop at its own position, so any stride works
    # (a one-token model too); --grid / --region step on whole UNI tiles (a one-token model: whole windows).
    tile = pipe.image_size // m
    try:
        regions = [(slide, int(row), int(col)) for slide, row, col in args.region]
    except ValueError:
        raise ValueError(
            "--region SLIDE_DIR ROW COL: ROW and COL are patch grid indices (integers)"
        ) from None
    source = RegionSource(
        m,
        tile,
        t.caption_channels,
        images=args.image,
        grids=args.grid,
        dataset_regions=regions,
        data_root=args.data_root,
        features_root=args.features_root,
        region_size=args.region_size,
    )
    uni = load_uni_encoder(args.uni, device, args.dtype, t.caption_channels) if args.image else None
    settings = sample_settings(args, pipe, 1, args.workers if args.workers is not None else 0)
    region = RegionSettings(args.stride, args.decode_stride, args.sigma, args.window_batch)
    summary = sample_regions(pipe, source, args.out, settings, region, model_ref, vae_ref, uni=uni)
    if "done" in summary:
        print(
            f"{summary['done']}/{summary['regions']} regions in {args.out} ({summary['processes']} process(es))"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
