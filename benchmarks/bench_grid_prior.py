"""Coherence of reference-free token grids: the grid prior against the demo slide's real grid and today's
per-token prior (neighbour cosine, autocorrelation at 1-8 tokens), and the figure of docs/wsi.md.

    python -m benchmarks.bench_grid_prior --figure asset/wsi_grids.png

CPU, minutes: the real grid is the demo slide's (cmu_small_region.svs, 11 x 8 tiles of 256 px at 20x) through a
tiny UNI stand-in with random features (`build_tiny_uni(init_values=None)`; features that differ between tiles);
a 1-token prior is trained on its tokens, a 16-token prior (4 x 4, PixCell-1024's window) and a 36-token prior
(6 x 6, about the slide's coherence length; width 128, 1 block each) on its m x m windows, then grids of the real
one's size are sampled (8 seeds) by each method of `diffusion.prior.grid.sample_grid`. Tokens are centred by the
real grid's mean before the cosines (see diffusion/prior/grid.py). `--augment` trains the grid priors on the 8
rotations and flips of the slide's grid too (8 x the windows; tissue has no orientation): a prior that can fit
its few windows less closely.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def train_prior(windows: np.ndarray, m: int, steps: int, width: int, depth: int, batch: int = 40):
    from diffusion.flow import flow_matching_loss
    from diffusion.prior.model import UNIPrior

    torch.manual_seed(0)
    data = torch.from_numpy(windows)
    prior = UNIPrior(num_tokens=m * m, channels=data.shape[2], width=width, depth=depth, num_heads=2)
    flat = data.reshape(-1, data.shape[2])
    prior.set_data_stats(flat.mean(0), flat.std(0))
    x1 = prior.standardise(data)
    opt = torch.optim.AdamW(prior.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = x1[torch.randint(0, len(x1), (batch,), generator=gen)]
        loss = flow_matching_loss(prior, torch.randn(x.shape, generator=gen), x, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return prior.eval()


def pca_rgb(grids: list[np.ndarray], basis_from: np.ndarray) -> list[np.ndarray]:
    """Each grid's tokens projected on the 3 principal axes of `basis_from`, scaled to [0, 255] together."""
    flat = basis_from.reshape(-1, basis_from.shape[2])
    mean = flat.mean(0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    proj = [(g.reshape(-1, g.shape[2]) - mean) @ vt[:3].T for g in grids]
    lo, hi = np.percentile(proj[0], 2, axis=0), np.percentile(proj[0], 98, axis=0)
    return [
        (np.clip((p - lo) / (hi - lo + 1e-9), 0, 1) * 255).astype(np.uint8).reshape(*g.shape[:2], 3)
        for p, g in zip(proj, grids)
    ]


def figure(
    path: Path, slide_path: Path, real: np.ndarray, samples: dict[str, np.ndarray], table: dict
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion.data.slides import open_slide

    slide, _ = open_slide(slide_path)
    thumb = np.asarray(slide.get_thumbnail((400, 540)).convert("RGB"))
    names = list(samples)
    images = pca_rgb([real, *samples.values()], real)
    fig, axes = plt.subplots(1, 2 + len(names), figsize=(3.2 * (2 + len(names)), 4.2))
    axes[0].imshow(thumb)
    axes[0].set_title("demo slide (20x)")
    for ax, (title, img) in zip(axes[1:], [("real token grid", images[0]), *zip(names, images[1:])]):
        ax.imshow(img, interpolation="nearest")
        cos = table.get(title, {}).get("neighbour_cosine")
        ax.set_title(f"{title}\nneighbour cos {cos:.2f}" if cos is not None else title)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("UNI token grids (first 3 principal axes of the real grid as RGB; tiny random UNI stand-in)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    from diffusion.demo.slide import fetch_slide
    from diffusion.encoders import load_uni
    from diffusion.prior.grid import coherence, grid_windows, sample_grid
    from diffusion.sampling.grids import grid_from_slide
    from diffusion.standins import build_tiny_uni

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=900, help="training steps of the grid priors")
    p.add_argument("--windows", type=int, nargs="+", default=[4, 6], help="window sides m of the grid priors")
    p.add_argument("--augment", action="store_true", help="train on the grid's 8 rotations and flips too")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--figure", type=Path, default=None, help="write the figure here (PNG)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    slide_path = fetch_slide()
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_uni(Path(tmp) / "uni", init_values=None)
        real = grid_from_slide(slide_path, load_uni(Path(tmp) / "uni")).tokens
    center = real.reshape(-1, real.shape[2]).mean(0)
    table = {"real token grid": coherence(real, center)}
    per_token = train_prior(grid_windows(real, 1), 1, 150, 64, 2)
    grids = [real]
    if args.augment:
        grids = [np.ascontiguousarray(np.rot90(g, k)) for g in (real, real[::-1]) for k in range(4)]
    rows, cols = real.shape[:2]
    runs = [("per-token prior", per_token, "multidiffusion", rows, cols)]
    priors = {}
    for m in args.windows:
        windows = np.concatenate([grid_windows(g, m) for g in grids])
        priors[m] = train_prior(windows, m, args.steps, 128, 1)
        runs += [
            (f"{m} x {m} prior, {k}", priors[m], k, rows, cols)
            for k in ("multidiffusion", "shifted", "outpaint")
        ]
        # A layout the prior never saw whole: does the coherence hold beyond the slide's own 11 x 8 tokens?
        runs.append((f"{m} x {m} prior, multidiffusion, 24 x 24 grid", priors[m], "multidiffusion", 24, 24))
    samples = {}
    for name, prior, method, h, w in runs:
        grids = [
            sample_grid(prior, h, w, steps=30, method=method, generator=torch.Generator().manual_seed(s))
            for s in range(args.seeds)
        ]
        scores = [coherence(g, center) for g in grids]
        table[name] = {
            "neighbour_cosine": float(np.mean([s["neighbour_cosine"] for s in scores])),
            "range": (min(s["neighbour_cosine"] for s in scores), max(s["neighbour_cosine"] for s in scores)),
            "autocorrelation": list(np.mean([s["autocorrelation"] for s in scores], axis=0)),
        }
        samples[name] = grids[0]
    ref = table["real token grid"]["neighbour_cosine"]
    print(
        f"{rows} x {cols} token grids (unless named), {args.seeds} seeds; grid priors trained {args.steps} steps"
        f"{' on the 8 rotations and flips' if args.augment else ''}\n"
    )
    print("| grid | neighbour cosine | vs real | single samples | autocorrelation at 1, 2, 4, 8 tokens |")
    print("| --- | --- | --- | --- | --- |")
    for name, res in table.items():
        ac = res["autocorrelation"]
        gap = res["neighbour_cosine"] / ref - 1
        lo, hi = res.get("range", (res["neighbour_cosine"],) * 2)
        print(
            f"| {name} | {res['neighbour_cosine']:.3f} | {gap:+.0%} | {lo:.2f}-{hi:.2f} "
            f"| {ac[0]:.2f}, {ac[1]:.2f}, {ac[3]:.2f}, {ac[7]:.2f} |"
        )
    if args.figure:
        m = max(priors)
        big = sample_grid(
            priors[m], 16, 16, steps=30, method="outpaint", generator=torch.Generator().manual_seed(0)
        )
        samples = {
            "per-token prior": samples["per-token prior"],
            f"{m} x {m} prior, multidiffusion": samples[f"{m} x {m} prior, multidiffusion"],
            f"{m} x {m} prior, 16 x 16 grid": big,
        }
        figure(args.figure, slide_path, real, samples, table)
        print(f"\nfigure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
