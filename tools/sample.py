"""Sample PixCell images (256 or 1024 px, set by the model) from UNI2-h conditions, at any scale, resumably.

    # 1000 random patches of the dataset index, conditioned on their stored UNI features (+ the real crops)
    python -m tools.sample --model StonyBrook-CVLab/PixCell-256 --index patches/metadata/patch_names_all.hdf5 \\
        --n-images 1000 --out runs/syn256
    # your own H&E images (UNI2-h computed on the fly; a 1024 px image gives 16 conditions at 256 px)
    python -m tools.sample --model StonyBrook-CVLab/PixCell-1024 --images my_patches/ --out runs/mine
    # precomputed embeddings, (N, T, 1536) in an .npy or .safetensors
    python -m tools.sample --model exported/pixcell_256 --embeddings uni.npy --out runs/emb
    # with a LoRA adapter of train_scripts/train_lora.py (or a published *_lora.pth), at 0.8 of its strength
    python -m tools.sample --model StonyBrook-CVLab/PixCell-256 --lora work_dirs/lora_256/lora.safetensors \\
        --lora-scale 0.8 --embeddings uni.npy --out runs/lora
    # no reference image: 5000 conditions drawn from a trained UNI prior (train_scripts/train_prior.py)
    python -m tools.sample --model StonyBrook-CVLab/PixCell-1024 --prior work_dirs/prior1024 --label luad \
        --prior-guidance 2.0 --n-images 5000 --out runs/luad
    # cell-mask ControlNet: layout from masks/<name>.png, style from each name's UNI tokens
    python -m tools.sample --model StonyBrook-CVLab/PixCell-256 --controlnet CONTROLNET --masks masks/ \\
        --embeddings uni.safetensors --out runs/masked
    # many GPUs / nodes: the same command under accelerate; processes take disjoint shards
    accelerate launch --num_processes 8 -m tools.sample ...

Writes OUT/syn/<name>.png, OUT/real/<name>.png (when a real image exists; never with --prior), OUT/manifest.jsonl,
OUT/run.json.
To resume after a crash, run the same command again: finished images are kept and the rest regenerated
identically (per-image seeds from --seed and the image name).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusion.command import check_paths, run_cli, runtime_device
from diffusion.geometry import UNI_TILE, tokens_side
from diffusion.prior.model import DEFAULT_FLOW_STEPS, check_prior_fits, load_prior, prior_folder
from diffusion.prior.sampling import PriorSource
from diffusion.sampling.conditions import EmbeddingSource, FolderSource, IndexSource
from diffusion.sampling.loading import default_batching, load_pipeline, load_uni_encoder
from diffusion.sampling.runner import MaskControl, model_reference, sample_patches
from tools.cli import (
    add_lora_args,
    add_model_args,
    add_output_args,
    add_runtime_args,
    add_sampler_args,
    pipeline_sources,
    sample_settings,
)

log = logging.getLogger("pixcell.sample")


def read_patch_list(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"--patches {file}: no such file (a text file, one relative patch path a line)"
        )
    names = [
        line.strip() for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    if not names:
        raise ValueError(f"--patches {file}: no patch paths inside")
    return names


def main(argv: Sequence[str] | None = None, model_default: str | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, model_default)
    add_lora_args(p)
    src = p.add_argument_group(
        "conditions (give exactly one of --index, --patches, --images, --embeddings, --prior)"
    )
    src.add_argument("--index", help="dataset index: <root>/metadata/patch_names_all.hdf5")
    src.add_argument(
        "--patches", help="text file of patch paths relative to --data-root (instead of --index)"
    )
    src.add_argument("--images", nargs="+", help="image files or folders (UNI2-h computed on the fly)")
    src.add_argument("--embeddings", help=".npy / .safetensors of UNI embeddings, (N, T, C) or (N, C)")
    src.add_argument("--data-root", help="patches folder (default: the index's root)")
    src.add_argument(
        "--features",
        default="npy",
        choices=["npy", "packed"],
        help="stored features: per-patch .npy or packed",
    )
    src.add_argument(
        "--features-root",
        help="features folder (default: beside the patches; packed: <root>/features_packed)",
    )
    src.add_argument("--keys", nargs="+", help="index datasets to draw from (default: all)")
    src.add_argument(
        "--n-images", type=int, help="a random subset of this many crops (--index, --patches); --prior: count"
    )
    pri = p.add_argument_group("UNI prior (no reference image; train_scripts/train_prior.py)")
    pri.add_argument("--prior", help="UNI prior: a train_prior.py work dir or its prior/ folder")
    pri.add_argument("--label", help="the label to sample (one the prior was trained with); default: any")
    pri.add_argument(
        "--prior-guidance", type=float, default=1.0, help="w of the prior's label guidance (default 1: none)"
    )
    pri.add_argument("--prior-steps", type=int, default=None, help="Euler steps of the prior (default 50)")
    ctl = p.add_argument_group("cell-mask ControlNet (PixCell-256-Cell-ControlNet or a trained one)")
    ctl.add_argument(
        "--controlnet", help="ControlNet: hub id, controlnet/ folder, or a training checkpoint's"
    )
    ctl.add_argument(
        "--masks", help="folder of cell masks, <name>.png per generated image (binary or instance)"
    )
    ctl.add_argument("--controlnet-scale", type=float, default=1.0, help="0: the base model alone")
    add_sampler_args(p)
    add_runtime_args(p)
    add_output_args(p)
    p.add_argument(
        "--batch", type=int, default=None, help="images per forward (default: 64/T on GPU, 8/T on CPU)"
    )
    args = p.parse_args(argv)
    if bool(args.controlnet) != bool(args.masks):
        raise ValueError("--controlnet and --masks go together (the ControlNet needs a mask per image)")

    given = [k for k in ("index", "patches", "images", "embeddings", "prior") if getattr(args, k)]
    if len(given) != 1:
        raise ValueError(
            "give exactly one condition source: --index, --patches, --images, --embeddings or --prior"
            + (f" (got {', '.join('--' + k for k in given)})" if given else "")
        )
    if args.n_images is not None and given[0] not in ("index", "patches", "prior"):
        raise ValueError("--n-images applies to --index / --patches / --prior")
    if args.prior and args.n_images is None:
        raise ValueError("--prior needs --n-images (how many conditions to draw)")
    if not args.prior and (args.label or args.prior_steps is not None):
        raise ValueError("--label and --prior-steps go with --prior")

    check_paths(
        index=[args.index],
        patches=[args.patches],
        images=args.images,
        embeddings=[args.embeddings],
        data_root=[args.data_root],
        features_root=[args.features_root],
        masks=[args.masks],
        prior=[args.prior],
    )
    device = runtime_device(args.device)
    pipe, model_ref, vae_ref = load_pipeline(pipeline_sources(args), device)
    t = pipe.transformer.config
    m = tokens_side(t.caption_num_tokens)
    tile = pipe.image_size // m  # px per UNI token: 256 for every published model
    if tile != UNI_TILE:
        log.warning(
            "this model makes %d px images from %d tokens: %d px per token, not UNI's %d",
            pipe.image_size,
            t.caption_num_tokens,
            tile,
            UNI_TILE,
        )
    uni = None
    if args.index or args.patches:
        source = IndexSource(
            m,
            tile,
            t.caption_channels,
            index_file=args.index,
            patches=read_patch_list(args.patches) if args.patches else None,
            data_root=args.data_root,
            features_root=args.features_root,
            keys=args.keys,
            n_images=args.n_images,
            seed=args.seed,
            features=args.features,
        )
    elif args.images:
        source = FolderSource(m, tile, args.images, t.caption_channels)
        uni = load_uni_encoder(args.uni, device, args.dtype, t.caption_channels)
    elif args.prior:
        prior = load_prior(args.prior, device)
        check_prior_fits(prior, t.caption_num_tokens, t.caption_channels, f"--prior {args.prior}")
        try:
            prior.label_ids(args.label, 1)
        except ValueError as err:
            raise ValueError(f"--label {args.label}: {err}") from None
        source = PriorSource(
            m,
            tile,
            t.caption_channels,
            prior=prior,
            n_images=args.n_images,
            prior_ref=model_reference(prior_folder(args.prior)),
            label=args.label,
            guidance=args.prior_guidance,
            steps=args.prior_steps or DEFAULT_FLOW_STEPS,
            seed=args.seed,
        )
    else:
        source = EmbeddingSource(m, tile, args.embeddings, t.caption_channels)

    batch, workers = default_batching(args.batch, args.workers, t.caption_num_tokens, device)
    if args.prior:
        workers = 0  # the prior draws conditions on the sampling device, in this process
    settings = sample_settings(args, pipe, batch, workers)
    control = None
    if args.controlnet:
        control = MaskControl(Path(args.masks), args.controlnet_scale, model_reference(args.controlnet))
    summary = sample_patches(pipe, source, args.out, settings, model_ref, vae_ref, uni=uni, control=control)
    if "done" in summary:
        print(
            f"{summary['done']}/{summary['images']} images in {args.out} ({summary['processes']} process(es))"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
