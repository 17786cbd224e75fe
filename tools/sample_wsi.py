"""Generate a whole slide of any size (32,768^2 px at 20x is the design point) in bounded memory, written as a
pyramidal tiled BigTIFF that OpenSlide, tiffslide and QuPath open.

    # conditioned on a real slide: UNI2-h tokens computed on the fly at 20x (a region, in level-0 px)
    python -m tools.sample_wsi --slide case.svs --region 0 0 16384 16384 --out runs/wsi_case
    # on the patch features TRIDENT or CLAM already wrote (features + coords); holes filled from neighbours
    python -m tools.sample_wsi --features trident/20x_256px_0px_overlap/features_uni_v2/case.h5 --out runs/wsi_h5
    # on a token grid file you edited (diffusion.sampling.grids.TokenGrid: paste, blend, repeat, crop)
    python -m tools.sample_wsi --grid edited.npy --out runs/wsi_edit
    # no reference: a 128 x 128 token grid (32,768 px) from the 16-token UNI prior, by sliding windows
    python -m tools.sample_wsi --prior work_dirs/prior1024 --grid-size 128 128 --label luad --out runs/wsi_prior
    # img2img (SDEdit) and inpainting of a region: start from its pixels, regenerate where the mask is white
    python -m tools.sample_wsi --slide case.svs --region 0 0 4096 4096 --init-from-slide --strength 0.6 \\
        --mask mask.png --out runs/wsi_inpaint
    # several GPUs share one slide: start the same command once per GPU (or under torchrun / accelerate)
    CUDA_VISIBLE_DEVICES=1 python -m tools.sample_wsi ... &  CUDA_VISIBLE_DEVICES=2 python -m tools.sample_wsi ...

Writes OUT/slide.tif (pyramidal BigTIFF, Aperio layout, 0.5 um/px, 20x), OUT/grid.npy (the token grid it was
conditioned on), OUT/summary.json (sizes, windows, seconds per window, peak memory), and with --view
OUT/viewer/index.html (an OpenSeadragon page over Deep Zoom tiles). OUT/work/ holds the latents on disk; to
resume after a crash or a kill, run the same command again (diffusion/sampling/wsi.py explains how).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffusion.atomic import atomic_path
from diffusion.command import check_paths, run_cli, runtime_device
from diffusion.encoders import UNIEncoder
from diffusion.geometry import tokens_side
from diffusion.sampling.loading import load_pipeline, load_uni_encoder
from tools.cli import (
    add_lora_args,
    add_model_args,
    add_runtime_args,
    add_sampler_args,
    check_sampler_args,
    pipeline_sources,
)

log = logging.getLogger("pixcell.sample_wsi")
MODEL = "StonyBrook-CVLab/PixCell-1024"
SOURCES = ("grid", "slide", "features", "prior")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, MODEL)
    add_lora_args(p)
    src = p.add_argument_group("conditions (exactly one of --grid, --slide, --features, --prior)")
    src.add_argument("--grid", help="token grid .npy (rows, cols, C): one UNI token per 256 px tile at 20x")
    src.add_argument("--slide", help="a real slide (openslide / tiffslide): UNI2-h tokens at 20x on the fly")
    src.add_argument(
        "--region", type=int, nargs=4, metavar=("X", "Y", "W", "H"), help="--slide region, level-0 px"
    )
    src.add_argument("--mpp", type=float, help="--slide level-0 um/px when its metadata has none")
    src.add_argument("--features", help="TRIDENT / CLAM patch features .h5 (datasets features, coords)")
    src.add_argument(
        "--fill", default="nearest", choices=["nearest", "mean"], help="tokens for tiles without a patch"
    )
    src.add_argument("--prior", help="UNI prior (train_scripts/train_prior.py work dir or its prior/ folder)")
    src.add_argument("--grid-size", type=int, nargs=2, metavar=("ROWS", "COLS"), help="--prior grid, tokens")
    src.add_argument("--label", help="--prior label (one it was trained with)")
    src.add_argument("--prior-guidance", type=float, default=1.0, help="w of the prior's label guidance")
    src.add_argument("--prior-steps", type=int, default=None, help="Euler steps of the prior (default 50)")
    edit = p.add_argument_group("editing (img2img / inpainting)")
    edit.add_argument("--init", help="init image (PNG/TIFF, the region's size in px) to start from")
    edit.add_argument("--init-from-slide", action="store_true", help="start from the --slide region's pixels")
    edit.add_argument("--strength", type=float, default=1.0, help="SDEdit strength: 1 = from noise (default)")
    edit.add_argument("--mask", help="inpainting mask image: white = regenerate, black = keep (any size)")
    edit.add_argument("--feather", type=int, default=4, help="mask border ramp, latent px (8 px each)")
    win = p.add_argument_group("windows and decoding")
    win.add_argument("--stride", type=int, default=None, help="latent px between windows (default: half)")
    win.add_argument(
        "--window-batch", type=int, default=None, help="windows per forward (default: all on GPU)"
    )
    win.add_argument("--decode-tile", type=int, default=64, help="latent px per decoded block (default 64)")
    win.add_argument("--decode-margin", type=int, default=8, help="latent px of blended overlap (default 8)")
    win.add_argument("--vae-batch", type=int, default=4, help="decoded blocks per VAE call")
    add_sampler_args(p)
    add_runtime_args(p)  # --format png: lossless deflate tiles; jpeg: JPEG tiles (quality 90)
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="output folder: slide.tif, grid.npy, summary.json, work/")
    out.add_argument("--view", action="store_true", help="also write OUT/viewer/ (OpenSeadragon, Deep Zoom)")
    out.add_argument("--keep-work", action="store_true", help="keep OUT/work/ (latents, pixels) when done")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--compile", action="store_true", help="torch.compile each transformer block (GPU runs)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str:
    """One-line errors before any model loads; -> the condition source."""
    given = [k for k in SOURCES if getattr(args, k)]
    if len(given) != 1:
        raise ValueError("give exactly one condition source: --grid, --slide, --features or --prior")
    paths = {k: [getattr(args, k)] for k in ("grid", "slide", "features", "prior", "init", "mask")}
    check_paths(**paths)
    if args.prior and args.grid_size is None:
        raise ValueError("--prior needs --grid-size ROWS COLS (tokens; 128 128 is 32,768 px)")
    if args.grid_size is not None and (not args.prior or min(args.grid_size) < 1):
        raise ValueError("--grid-size ROWS COLS (>= 1 each) goes with --prior")
    if (args.region or args.mpp is not None) and not args.slide:
        raise ValueError("--region and --mpp go with --slide")
    if args.init_from_slide and not args.slide:
        raise ValueError("--init-from-slide needs --slide")
    if args.init and args.init_from_slide:
        raise ValueError("give one of --init and --init-from-slide")
    has_init = bool(args.init or args.init_from_slide)
    if not 0 < args.strength <= 1:
        raise ValueError(f"--strength {args.strength}: expected a number in (0, 1]")
    if (args.strength < 1 or args.mask) and not has_init:
        raise ValueError(
            "--strength below 1 and --mask need an image to start from: --init or --init-from-slide"
        )
    for flag in ("stride", "window_batch", "decode_tile", "vae_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: expected >= 1")
    if args.decode_margin < 0 or args.feather < 0:
        raise ValueError("--decode-margin and --feather: expected >= 0")
    check_sampler_args(args)
    return given[0]


def fit_grid(rows: int, cols: int, m: int, step: int) -> tuple[int, int]:
    """The largest (rows', cols') <= (rows, cols) that windows of m tokens at `step` tokens cover edge to edge."""
    fit = []
    for n, what in ((rows, "rows"), (cols, "columns")):
        if n < m:
            raise ValueError(f"the region is {n} tokens in {what}; the model's window needs {m} (x 256 px)")
        fit.append(m + (n - m) // step * step)
    return fit[0], fit[1]


def load_grid(
    args: argparse.Namespace, source: str, channels: int, device: torch.device, uni: UNIEncoder | None
) -> tuple[np.ndarray, dict]:
    """The condition grid (rows, cols, C) of the chosen source, and what to record about it."""
    from diffusion.sampling.grids import TokenGrid, grid_from_features, grid_from_slide

    info: dict = {"source": source}
    if source == "grid":
        grid = TokenGrid.load(args.grid)
        info["path"] = str(args.grid)
    elif source == "features":
        grid, found = grid_from_features(args.features)
        info.update(found, path=str(args.features), holes=int(grid.holes.sum()))
        grid = grid.fill_holes(args.fill)
    elif source == "slide":
        region = tuple(args.region) if args.region else None
        grid = grid_from_slide(args.slide, uni, region, args.mpp, progress=not args.no_progress)
        info.update(path=str(args.slide), region=list(region) if region else None)
    else:
        import torch

        from diffusion.prior.grid import sample_grid
        from diffusion.prior.model import DEFAULT_FLOW_STEPS, check_prior_fits, load_prior

        prior = load_prior(args.prior, device)
        if prior.channels != channels:
            check_prior_fits(prior, prior.num_tokens, channels, f"--prior {args.prior}")
        rows, cols = args.grid_size
        steps = args.prior_steps or DEFAULT_FLOW_STEPS
        gen = torch.Generator().manual_seed(args.seed)
        grid = TokenGrid(
            sample_grid(prior, rows, cols, args.label, args.prior_guidance, steps, generator=gen)
        )
        info.update(
            path=str(args.prior), label=args.label, prior_guidance=args.prior_guidance, prior_steps=steps
        )
    return grid.check(channels, f"--{source} {getattr(args, source)}").tokens, info


def read_init(args: argparse.Namespace, rows: int, cols: int, tile_px: int) -> np.ndarray:
    """The init image (H, W, 3) uint8 of a rows x cols token region, `tile_px` px per token (256 for PixCell;
    a small stand-in model has fewer, and the slide's 20x tiles are resized to them)."""
    from PIL import Image

    shape_px = (rows * tile_px, cols * tile_px)
    if args.init:
        image = np.asarray(Image.open(args.init).convert("RGB"))
        if image.shape[:2] != shape_px:
            raise ValueError(
                f"--init {args.init}: {image.shape[0]}x{image.shape[1]} px; the region is {shape_px[0]}x{shape_px[1]}"
            )
        return image
    from diffusion.data.slides import open_slide, slide_mpp
    from diffusion.sampling.grids import slide_tiles_at_20x

    slide, _ = open_slide(args.slide)
    mpp = args.mpp if args.mpp is not None else slide_mpp(slide, args.slide)
    _, _, read_row = slide_tiles_at_20x(slide, mpp, tuple(args.region) if args.region else None)
    image = np.empty((*shape_px, 3), np.uint8)
    for r in range(rows):
        tiles = read_row(r)[:cols]
        if tile_px != tiles.shape[1]:
            tiles = np.stack(
                [np.asarray(Image.fromarray(t).resize((tile_px, tile_px), Image.BICUBIC)) for t in tiles]
            )
        image[r * tile_px : (r + 1) * tile_px] = np.concatenate(list(tiles), axis=1)
    return image


def read_mask(path: str, shape_latent: tuple[int, int], feather: int) -> np.ndarray:
    """The inpainting mask at latent size (H, W) in [0, 1]: resized (nearest), binarised, feathered."""
    from PIL import Image

    from diffusion.sampling.wsi import feathered_mask

    try:
        img = Image.open(path).convert("L")
    except OSError as err:
        raise ValueError(f"--mask {path}: not an image ({err})") from None
    h, w = shape_latent
    small = np.asarray(img.resize((w, h), Image.NEAREST)) > 127
    if not small.any():
        raise ValueError(f"--mask {path}: nothing to regenerate (no white pixels)")
    return feathered_mask(small.astype(np.uint8), 1, feather)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: Sequence[str] | None = None) -> int:
    from diffusion.encoders import vae_scale_factor
    from diffusion.sampling.wsi import WSIRun, WSISettings, encode_region, prepare_work

    args = parse_args(argv)
    source = check_args(args)
    out = Path(args.out)
    device = runtime_device(args.device)
    pipe, model_ref, vae_ref = load_pipeline(pipeline_sources(args), device)
    cfg = pipe.transformer.config
    try:
        m = tokens_side(cfg.caption_num_tokens)
    except ValueError as err:
        raise ValueError(f"--model {args.model}: {err}") from None
    uni = load_uni_encoder(args.uni, device, args.dtype, cfg.caption_channels) if source == "slide" else None
    grid_path = out / "grid.npy"
    work = out / "work"
    if (work / "plan.json").exists() and grid_path.exists() and source in ("slide", "prior"):
        grid = np.load(
            grid_path
        )  # a rerun: the tokens (or prior sample) of the first run, not computed again
        info = (
            json.loads((out / "grid.json").read_text())
            if (out / "grid.json").exists()
            else {"source": source}
        )
    else:
        grid, info = load_grid(args, source, cfg.caption_channels, device, uni)
    tile = cfg.sample_size // m
    stride = args.stride if args.stride is not None else max(tile, cfg.sample_size // 2)
    if stride % tile:
        raise ValueError(f"--stride {stride} latent px: expected a multiple of {tile} (one UNI tile)")
    rows, cols = fit_grid(grid.shape[0], grid.shape[1], m, stride // tile)
    if (rows, cols) != grid.shape[:2]:
        log.info("grid %dx%d tokens trimmed to %dx%d (whole windows)", *grid.shape[:2], rows, cols)
        grid = grid[:rows, :cols]
    with atomic_path(grid_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, grid)
    (out / "grid.json").write_text(json.dumps(info, indent=1))
    interval = tuple(args.guidance_interval) if args.guidance_interval else None
    sampling = pipe.sampling_options(args.steps, args.guidance, interval, args.allow_negative_guidance)
    settings = WSISettings(
        sampler=sampling.sampler,
        steps=sampling.steps,
        guidance=sampling.guidance,
        guidance_interval=sampling.guidance_interval,
        seed=args.seed,
        stride=stride,
        strength=args.strength,
        decode_tile=args.decode_tile,
        decode_margin=args.decode_margin,
        compression="deflate" if args.format == "png" else "jpeg",
        window_batch=args.window_batch,
        vae_batch=args.vae_batch,
        progress=not args.no_progress,
    )
    plan = {**settings.plan_keys(), "model": model_ref, "vae": vae_ref, "dtype": args.dtype, "source": source}
    factor = vae_scale_factor(pipe.vae)
    known = mask = None
    if args.init or args.init_from_slide:
        known = encode_region(pipe.vae, read_init(args, rows, cols, tile * factor))
        if args.mask:
            mask = read_mask(args.mask, (rows * tile, cols * tile), args.feather)
    inputs = prepare_work(work, grid, plan, known, mask)
    del known, grid
    run = WSIRun(work, pipe.transformer, pipe.vae, inputs, settings)
    rss_start = peak_rss_mb()
    start = time.time()
    ran = run.run(out / "slide.tif", note=f"PixCell {model_ref}")
    elapsed = time.time() - start
    if args.view:
        from diffusion.viewer import write_viewer

        write_viewer(out / "slide.tif", out / "viewer")
    summary = {
        "slide": str(out / "slide.tif"),
        "size_px": [run.height * factor, run.width * factor],
        "grid_tokens": [rows, cols],
        "windows_per_step": run.windows_per_step,
        "steps": run.steps - run.start,
        "tasks_run_here": ran,
        "seconds": round(elapsed, 2),
        "seconds_per_window": round(elapsed / max(1, run.windows_per_step * (run.steps - run.start)), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_run_mb": round(rss_start, 1),
        "conditions": info,
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    if not args.keep_work:
        run.clear_work()
    print(f"{out / 'slide.tif'}: {summary['size_px'][1]}x{summary['size_px'][0]} px in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
