"""Whole-slide generation: peak memory and seconds per window against the slide's size, and the 32,768^2 plan.

    python -m benchmarks.bench_wsi                       # tiny CPU model: 2,048^2, 4,096^2, 8,192^2 px
    python -m benchmarks.bench_wsi --sizes 2048 --steps 1

Each size runs `tools.sample_wsi` in its own process (a tiny PixCell-tiny-128-T16 with random weights, 32 px per
token, and the smallest f8 VAE), so its peak RSS is that run's alone; the tool reports it with the seconds per
window (all of a step's windows, guided, divided by windows x steps; decoding and the pyramid included). The
memory target: the 8,192^2 run within 25% of the 2,048^2 one. At 32 px per token these are the token grids of
16,384 / 32,768 / 65,536 px slides of PixCell-1024 (64^2 to 256^2 tokens): the window and band counts are the
real ones, the pixels 1/8 of them.

The 32,768^2 plan for PixCell-1024 on one GPU is computed from a window throughput (`--window-seconds`, default
the H100 measurement in benchmarks/results/bench_sample_h100.txt: a 4,096 px region, 49 windows x 20 guided
DPM-Solver++ steps, bf16, decode included, 38.72 s -> 0.0395 s per window-step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
H100_WINDOW_SECONDS = 38.72 / (49 * 20)


def build_models(root: Path) -> tuple[Path, Path]:
    from diffusion.standins import save_wsi_models

    return save_wsi_models(root)


def run_size(size: int, root: Path, model: Path, vae: Path, steps: int) -> dict:
    tokens = size // 32
    grid = root / f"grid{size}.npy"
    np.save(grid, np.random.default_rng(0).standard_normal((tokens, tokens, 96)).astype(np.float32))
    out = root / f"out{size}"
    cmd = [
        sys.executable,
        "-m",
        "tools.sample_wsi",
        "--model",
        str(model),
        "--vae",
        str(vae),
        "--grid",
        str(grid),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--steps",
        str(steps),
        "--stride",
        "8",
        "--window-batch",
        "256",
        "--decode-tile",
        "32",
        "--decode-margin",
        "4",
        "--vae-batch",
        "1",
        "--format",
        "jpeg",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return json.loads((out / "summary.json").read_text())


def plan_32k(window_seconds: float, steps: int = 20) -> list[str]:
    """PixCell-1024 (128 latent px windows, stride 64) over a 32,768^2 px slide."""
    latent = 32768 // 8
    per_side = (latent - 128) // 64 + 1
    windows = per_side**2
    seconds = windows * steps * window_seconds
    latents_gb = 2 * latent * latent * 16 * 4 / 2**30
    rows_gb = per_side * 128 * latent * 16 * 4 / 2**30
    pixels_gb = 32768 * 32768 * 3 / 2**30
    return [
        f"32,768^2 px with PixCell-1024 at stride 64: {per_side} x {per_side} = {windows} windows per step, "
        f"{windows * steps} window-steps at {steps} steps",
        f"at {window_seconds:.4f} s per window-step (one GPU): {seconds / 3600:.1f} h ({seconds:.0f} s)",
        f"disk in OUT/work: latents {latents_gb:.1f} GiB, one step's window rows {rows_gb:.1f} GiB, level-0 pixels "
        f"{pixels_gb:.1f} GiB, then the pyramid (JPEG, a few GiB)",
        "N GPUs sharing the bands (the same command once per GPU): about 1/N of that, the decode included",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="px per side")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--window-seconds", type=float, default=H100_WINDOW_SECONDS, help="for the 32,768^2 plan")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_wsi_") as tmp:
        root = Path(tmp)
        model, vae = build_models(root)
        for size in args.sizes:
            s = run_size(size, root, model, vae, args.steps)
            row = (
                f"| {size}^2 | {s['windows_per_step']} | {s['seconds']:.1f} | {s['seconds_per_window']:.4f} | "
                f"{s['peak_rss_mb']:.0f} | {s['peak_rss_mb'] - s['rss_before_run_mb']:.0f} |"
            )
            rows.append((size, s, row))
            print(row, flush=True)
    print(
        f"\n{args.steps} DPM-Solver++ steps, guidance 1.2, stride half a window, PixCell-tiny-128-T16 + micro VAE, "
        "CPU, one thread per process\n"
    )
    print("| region (px) | windows/step | seconds | s/window | peak RSS (MB) | of which the run (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for _, _, row in rows:
        print(row)
    if len(rows) > 1:
        first, last = rows[0][1]["peak_rss_mb"], rows[-1][1]["peak_rss_mb"]
        print(f"\npeak RSS {rows[-1][0]}^2 / {rows[0][0]}^2: {last / first:.3f} (target <= 1.25)")
    print("\nplan:")
    for line in plan_32k(args.window_seconds):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
