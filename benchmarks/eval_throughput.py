"""Throughput of tools/evaluate.py's embedding step and of the Frechet distance, printed as a table.

    python benchmarks/eval_throughput.py --images 512 --device cuda

Builds a UNI2-h-shaped encoder (the exact timm architecture, random weights: speed only, the numbers it
produces mean nothing), writes N random 256x256 PNG tiles twice (REAL, SYN), and times `evaluate` for
fd_uni2 + cos_uni2 per dtype, then the Frechet distance at 1536 and 2048 dimensions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.encoders import UNI2H_ARCH, UNI2H_KWARGS, resolve_timm_layers
from diffusion.metrics.distances import frechet_distance_from_features
from diffusion.metrics.evaluation import evaluate


def build_uni2h_shaped(out: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(UNI2H_ARCH, pretrained=False, **resolve_timm_layers(UNI2H_KWARGS))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"architecture": UNI2H_ARCH, "model_args": UNI2H_KWARGS}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=8)
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        for sub in ("real", "syn"):
            (root / sub).mkdir()
            for i in range(args.images):
                Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
                    root / sub / f"{i}.png"
                )
        uni = build_uni2h_shaped(root / "uni2h_random")
        for dtype in args.dtypes.split(","):
            kw = dict(
                metrics=["fd_uni2", "cos_uni2"],
                encoders=[f"uni2={uni}"],
                device=args.device,
                dtype=dtype,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                cache="none",
                progress=False,
            )
            evaluate(root / "real", root / "real", **kw)  # warm-up (model load, kernels)
            t = time.perf_counter()
            evaluate(root / "real", root / "syn", **kw)
            seconds = time.perf_counter() - t
            rows.append((f"embed+FD+cos UNI2-h-shaped {dtype}", 2 * args.images, seconds))
    for d in (1536, 2048):
        for n in (1000, 5000):
            a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
            t = time.perf_counter()
            frechet_distance_from_features(a, b)
            rows.append((f"Frechet distance, {d}-d", 2 * n, time.perf_counter() - t))
    print(
        f"device: {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'})"
    )
    print(f"| {'step':<40} | {'images':>7} | {'seconds':>8} | {'img/s':>8} |")
    print(f"|{'-' * 42}|{'-' * 8}:|{'-' * 9}:|{'-' * 9}:|")
    for name, n, s in rows:
        print(f"| {name:<40} | {n:>7} | {s:>8.2f} | {n / s:>8.1f} |")


if __name__ == "__main__":
    main()
