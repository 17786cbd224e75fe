"""The demo's encoder-free verdicts: morphology distances of every image set, and the region's seams.

The stand-in UNI space is a tiny ViT trained for a minute; it rewards blur (issue 29: 2-step DDIM scored better
than 20-step DPM-Solver++). The morphology measure (diffusion/metrics/morphology.py) needs no weights and says
what is wrong in words a pathologist uses (too few nuclei, no edges, mauve eosin). Here every set the demo made
is compared with the held-out tiles in it, with one shared-reference bootstrap, so differences between sets
(null condition against conditional) come with their own interval.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image


def write_vae_reconstructions(vae_dir: Path, real_dir: Path, out_dir: Path) -> list[Path]:
    """The VAE stand-in's reconstruction (posterior mean, decoded) of every image in `real_dir`, as PNG."""
    import torch

    from diffusion.encoders import decode_latents, encode_posterior, latents_to_model, load_vae

    vae = load_vae(vae_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in sorted(real_dir.rglob("*.png")):
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None] / 255
        with torch.no_grad():
            mean, _ = encode_posterior(vae, image)
            rec = decode_latents(vae, latents_to_model(mean, vae))[0]
        target = out_dir / path.relative_to(real_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rec.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(target)
        paths.append(target)
    return paths


def _images(folders: list[Path]) -> list[np.ndarray]:
    return [np.array(Image.open(p).convert("RGB")) for f in folders for p in sorted(f.rglob("*.png"))]


def morphology_verdicts(
    real: Path,
    sets: dict[str, list[Path]],
    differences: list[tuple[str, str]] = (),
    n_boot: int = 200,
) -> dict:
    """Morphology features of every set against the real folder's (threshold set on it): per set the FD of the
    standardised features [95% bootstrap], per-feature medians and Wasserstein distances; per (a, b) pair the
    difference FD(a) - FD(b) over the same resamples (> 0: b is closer to the real images)."""
    from scipy.stats import wasserstein_distance

    from diffusion.metrics.distances import compare_frechet_distances
    from diffusion.metrics.morphology import FEATURES, fit_thresholds, morphology_features, standardise

    real_images = _images([real])
    thresholds = fit_thresholds(real_images)
    images = {name: _images(folders) for name, folders in sets.items()}
    feats = {
        n: morphology_features(ims, thresholds) for n, ims in images.items() if len(ims) >= 2
    }  # else left out
    real_feats = morphology_features(real_images, thresholds)
    names = list(feats)
    z_real, *z_sets = standardise(real_feats, *(feats[n] for n in names))
    cmp = compare_frechet_distances(dict(zip(names, z_sets, strict=True)), z_real, n_boot=n_boot)
    result = {
        "thresholds": asdict(thresholds),
        "features": list(FEATURES),
        "real": {"n": len(real_feats), "median": np.median(real_feats, axis=0).tolist()},
        "sets": {},
        "differences": {},
    }
    for name in names:
        f = feats[name]
        result["sets"][name] = {
            "n": len(f),
            "fd": asdict(cmp.estimate(name)),
            "median": np.median(f, axis=0).tolist(),
            "wasserstein": [wasserstein_distance(real_feats[:, j], f[:, j]) for j in range(len(FEATURES))],
        }
    for a, b in differences:
        if a in names and b in names:
            result["differences"][f"{a} - {b}"] = asdict(cmp.difference(a, b))
    return result


def seam_report(
    real_region: Path, generated_region: Path, window_px: int, stride_px: int | None = None
) -> dict:
    """Border step ratios (columns, rows) of the generated and the real region at the model's window period (where
    whole-window tiling puts its seams) and, given a stride, at the stride's period (every window border)."""
    from diffusion.metrics.seams import border_step_ratio

    images = {
        n: np.array(Image.open(p).convert("RGB"))
        for n, p in (("generated", generated_region), ("real", real_region))
    }
    out = {"window_px": window_px}
    for key, period in (("window", window_px), ("stride", stride_px)):
        if period and period >= 2:
            out[key] = {"period_px": period}
            for name, image in images.items():
                cols, rows = border_step_ratio(image, period)
                out[key][name] = {"columns": cols, "rows": rows}
    return out
