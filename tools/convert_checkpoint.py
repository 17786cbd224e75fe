"""Convert PixCell checkpoints between the original PixArt-style file and the diffusers folder layout.

    # original .pth/.ckpt -> diffusers transformer folder (EMA weights by default; --raw for `state_dict`)
    python -m tools.convert_checkpoint PixCell-256.pth out/PixCell-256-transformer
    # diffusers folder (or hub id) -> original file
    python -m tools.convert_checkpoint out/PixCell-256-transformer PixCell-256.pth --to original

Strict both ways: a checkpoint with unknown keys, or of another model size, is a one-line error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusion.atomic import atomic_path
from diffusion.command import run_cli
from diffusion.model.loading import ORIGINAL_SUFFIXES, load_transformer, save_original_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="original .pth/.ckpt file, diffusers folder, or hub id")
    p.add_argument("dst", help="output: a folder (--to diffusers) or a .pth/.ckpt file (--to original)")
    p.add_argument(
        "--to", choices=["diffusers", "original"], default=None, help="default: from the dst suffix"
    )
    p.add_argument("--raw", action="store_true", help="take `state_dict` instead of `state_dict_ema`")
    p.add_argument(
        "--as-ema", action="store_true", help="original output: also store the weights as state_dict_ema"
    )
    args = p.parse_args(argv)

    to = args.to or ("original" if Path(args.dst).suffix in ORIGINAL_SUFFIXES else "diffusers")
    model = load_transformer(args.src, ema=not args.raw)
    if to == "original":
        if Path(args.dst).suffix not in ORIGINAL_SUFFIXES:
            raise ValueError(
                f"{args.dst}: an original checkpoint needs a {'/'.join(ORIGINAL_SUFFIXES)} suffix"
            )
        save_original_checkpoint(model, args.dst, as_ema=args.as_ema)
    else:
        with atomic_path(args.dst) as tmp:
            model.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.dst} ({to}, {n / 1e6:.1f}M parameters, {model.config.caption_num_tokens} UNI token(s))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
