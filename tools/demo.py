"""`make demo` (placeholder until the full real-slide demo lands): sample a tiny random PixCell end to end.

The tiny transformer and VAE here are random stand-ins built by the project's own code, not PixCell weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from diffusion.encoders import build_tiny_vae
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.pipeline import PixCellPipeline
from tools.cli import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo_output")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vae = build_tiny_vae(out / "tiny_vae_random")
    pipe = PixCellPipeline.from_parts(build_pixcell("PixCell-tiny-256").eval(), vae)
    images = pipe(torch.randn(4, 1, 1536), num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images
    grid = Image.new("RGB", (256 * 4, 256))
    for i, im in enumerate(images):
        grid.paste(im, (256 * i, 0))
    grid.save(out / "samples_tiny_random.png")
    print(f"wrote {out / 'samples_tiny_random.png'} (a tiny random model: noise-like by design)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
