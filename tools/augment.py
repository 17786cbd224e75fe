"""Label-preserving augmentation: N synthetic variants of every image of a labelled folder, in its class folder.

    python -m tools.augment DATA --model StonyBrook-CVLab/PixCell-256 --per-image 4 --out OUT
    python -m tools.augment DATA --model StonyBrook-CVLab/PixCell-256 --per-class-total 500 --out OUT  # balance
    accelerate launch --num_processes 8 -m tools.augment DATA ...   # processes take disjoint shards

DATA/<class>/<image> (any depth below the class folder) -> OUT/<class>/<image stem>_<k>.png, k = 0..N-1, each
generated from the UNI2-h tokens of its source image (computed on the fly), so it carries the source's class.
OUT/manifest.jsonl has one row per image: the synthetic file, its source image, class and variant, seed, model,
sampler, steps, guidance; OUT/run.json the settings. Images must have the model's size (256 px for
PixCell-256, 1024 px for PixCell-1024) unless --resize or --crop says how to get there.

The sampling machinery is tools/sample.py's (diffusion/sampling/runner.py): same model/VAE/UNI sources, batching,
progress, accelerate sharding. To resume, run the same command again: finished images are kept and the rest
regenerated identically (each variant's seed comes from --seed and its name).
Then measure what it bought: python -m tools.probe --train DATA --test TEST --synthetic OUT (docs/applications.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from diffusion.command import check_paths, run_cli, runtime_device
from diffusion.geometry import UNI_TILE, tokens_side
from diffusion.sampling.augment import ClassFolderSource, class_folders
from diffusion.sampling.loading import default_batching, load_pipeline, load_uni_encoder
from diffusion.sampling.runner import sample_patches
from tools.cli import (
    add_model_args,
    add_output_args,
    add_runtime_args,
    add_sampler_args,
    pipeline_sources,
    sample_settings,
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="labelled image folder: DATA/<class>/<image>")
    add_model_args(p)
    n = p.add_argument_group("how many (give one)").add_mutually_exclusive_group(required=True)
    n.add_argument("--per-image", type=int, help="synthetic variants of every image")
    n.add_argument(
        "--per-class-total", type=int, help="synthetic images per class, spread over its images (balancing)"
    )
    fit = p.add_argument_group("images of another size than the model's").add_mutually_exclusive_group()
    fit.add_argument("--resize", action="store_true", help="resize each whole image to the model's size")
    fit.add_argument(
        "--crop", action="store_true", help="take each image's central square of the model's size"
    )
    add_sampler_args(p)
    add_runtime_args(p)
    add_output_args(p, real=False)
    p.add_argument(
        "--batch", type=int, default=None, help="images per forward (default: 64/T on GPU, 8/T on CPU)"
    )
    args = p.parse_args(argv)

    check_paths(data=[args.data])
    class_folders(args.data)  # empty class folders and stray images: one line, before loading any model
    fit = "resize" if args.resize else "crop" if args.crop else "none"
    device = runtime_device(args.device)
    pipe, model_ref, vae_ref = load_pipeline(pipeline_sources(args), device)
    t = pipe.transformer.config
    m = tokens_side(t.caption_num_tokens)
    source = ClassFolderSource(
        m,
        pipe.image_size // m,
        args.data,
        t.caption_channels,
        per_image=args.per_image,
        per_class_total=args.per_class_total,
        fit=fit,
    )
    if pipe.image_size // m != UNI_TILE:
        print(f"warning: {pipe.image_size // m} px per UNI token, not UNI's {UNI_TILE}", file=sys.stderr)
    uni = load_uni_encoder(args.uni, device, args.dtype, t.caption_channels)
    settings = sample_settings(
        args, pipe, *default_batching(args.batch, args.workers, t.caption_num_tokens, device)
    )
    summary = sample_patches(pipe, source, args.out, settings, model_ref, vae_ref, uni=uni, syn_dir="")
    if "done" in summary:
        print(f"{summary['done']}/{summary['images']} synthetic images in {args.out} ({source.describe()})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
