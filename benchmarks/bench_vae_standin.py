"""How well the demo's VAE stand-in keeps nuclei and colour: train it on the demo's training tiles, reconstruct
every tile (posterior mean, decoded), and compare the reconstructions with the tiles by the encoder-free
morphology measure (diffusion/metrics/morphology.py; nuclei threshold set on the real tiles).

    make demo   # or at least its patches stage, for demo_output/patches
    python -m benchmarks.bench_vae_standin --patches demo_output/patches --out /tmp/vae --steps 600
    python -m benchmarks.bench_vae_standin --patches demo_output/patches --out /tmp/vae32 --steps 400 \\
        --crop 32 --batch 16 --edge-weight 0

Prints, for all tiles and for the held-out tiles alone, the morphology FD [95% bootstrap] and each feature's
median, real against reconstruction, with their ratio (issue 29's targets: nuclei density within 25%, edge
density >= 80%, eosin/haematoxylin within 20%). An existing --out folder is reused (its VAE is not retrained).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.data.index import default_index_file, read_index
from diffusion.demo.standins import train_vae_standin
from diffusion.metrics.morphology import compare_features, fit_thresholds, morphology_features


def reconstruct(vae_dir: Path, paths: list[Path]) -> list[np.ndarray]:
    from diffusion.encoders import decode_latents, encode_posterior, latents_to_model, load_vae

    vae = load_vae(vae_dir)
    out = []
    for p in paths:
        image = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None] / 255
        with torch.no_grad():
            mean, _ = encode_posterior(vae, image)
            rec = decode_latents(vae, latents_to_model(mean, vae))[0]
        out.append((rec.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=Path, required=True, help="the demo's patches root (with its index)")
    p.add_argument("--out", type=Path, required=True, help="VAE folder (trained here unless it exists)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--edge-weight", type=float, default=1.0)
    args = p.parse_args(argv)
    index = read_index(default_index_file(args.patches), ["cmu_train_256", "cmu_heldout_256"])
    train = [args.patches / n for n in index["cmu_train_256"]]
    held = [args.patches / n for n in index["cmu_heldout_256"]]
    start = time.perf_counter()
    log = train_vae_standin(
        train, args.out, steps=args.steps, crop=args.crop, batch=args.batch, edge_weight=args.edge_weight
    )
    print(f"VAE: {json.dumps(log)} ({time.perf_counter() - start:.0f} s)")
    real = [np.array(Image.open(q).convert("RGB")) for q in train + held]
    rec = reconstruct(args.out, train + held)
    for name, sl in (("all tiles", slice(None)), ("held-out tiles", slice(len(train), None))):
        thresholds = fit_thresholds(real[sl])
        r = compare_features(
            morphology_features(real[sl], thresholds),
            {"rec": morphology_features(rec[sl], thresholds)},
            thresholds,
        )["rec"]
        f = r.frechet
        print(f"\n{name} ({r.n_real}): morphology FD {f.value:.2f} [{f.low:.2f}, {f.high:.2f}]")
        for row in r.rows:
            ratio = row.syn_median / row.real_median if row.real_median else float("nan")
            print(
                f"  {row.name:20s} real {row.real_median:9.4g}  reconstruction {row.syn_median:9.4g}  x{ratio:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
