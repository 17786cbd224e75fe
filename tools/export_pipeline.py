"""Export a training run's EMA weights as a diffusers pipeline folder (transformer + VAE + scheduler).

    python -m tools.export_pipeline work_dirs/pixcell_256 exported/pixcell_256          # latest checkpoint
    python -m tools.export_pipeline work_dirs/pixcell_256/checkpoints/checkpoint-0100000 out --weights model

    # a LoRA adapter merged into its base: any model source (hub id, folder, .pth, work dir) + the adapter
    python -m tools.export_pipeline StonyBrook-CVLab/PixCell-256 exported/lora_256 \\
        --lora work_dirs/lora_256/lora.safetensors [--lora-scale 0.8]

The folder loads with `PixCellPipeline.from_pretrained(out)` and every sampling tool (`--model out`). The VAE is
copied in from --vae (SD3.5 by default) so the folder is self-contained; --no-vae leaves it out (the pipeline then
falls back to SD3.5's VAE when loaded). With --lora the adapter is folded into the weights (W + s B A): a plain
PixCell transformer, no peft needed to sample it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusion.atomic import atomic_path
from diffusion.checkpoints import latest_checkpoint
from diffusion.command import run_cli
from diffusion.encoders import SD35_VAE_ID
from diffusion.sampling.samplers import SAMPLERS


def export_pipeline(
    source: str | Path,
    out: str | Path,
    vae: str | Path | None = SD35_VAE_ID,
    weights: str = "ema",
    sampler: str = "dpm-solver",
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> Path:
    """Write `out` (atomically) from the latest checkpoint of work dir `source`, or from checkpoint `source`;
    with `lora`, from any model source with the adapter merged in."""
    from diffusion.model.loading import load_transformer
    from diffusion.sampling.pipeline import PixCellPipeline

    if lora is not None:
        pipe = PixCellPipeline(load_transformer(source, ema=weights == "ema"), None, None)
        pipe.load_lora_weights(lora, scale=lora_scale)
        pipe.fuse_lora()
        transformer = pipe.transformer
    else:
        ckpt = latest_checkpoint(source)
        if ckpt is None:
            raise FileNotFoundError(
                f"{source}: no complete training checkpoint (a work dir or checkpoint-* folder)"
            )
        folder = ckpt / ("transformer_ema" if weights == "ema" else "transformer")
        transformer = load_transformer(folder)
    out = Path(out)
    with atomic_path(out) as tmp:
        if vae is None:
            transformer.save_pretrained(tmp / "transformer")
        else:
            pipe = PixCellPipeline.from_parts(transformer, vae, sampler=sampler)
            pipe.save_pretrained(tmp)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "source",
        help="training work dir (its latest checkpoint) or checkpoint-* folder; with --lora: the base",
    )
    p.add_argument("out", help="pipeline folder to write")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA (release) or raw weights")
    p.add_argument("--vae", default=SD35_VAE_ID, help="VAE to bundle: hub id or local folder")
    p.add_argument("--no-vae", action="store_true", help="write only the transformer")
    p.add_argument("--sampler", default="dpm-solver", choices=list(SAMPLERS))
    p.add_argument(
        "--lora", help="LoRA adapter to merge into the base model (train_scripts/train_lora.py output)"
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="adapter strength when merging")
    args = p.parse_args(argv)
    if args.lora is not None and not Path(args.lora).is_file():
        raise FileNotFoundError(f"--lora {args.lora}: no such file")
    out = export_pipeline(
        args.source,
        args.out,
        None if args.no_vae else args.vae,
        args.weights,
        args.sampler,
        args.lora,
        args.lora_scale,
    )
    print(f"wrote {out} ({args.weights} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
