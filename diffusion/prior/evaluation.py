"""How good is a UNI prior, in UNI space (no images needed): fidelity, coverage and memorisation.

    fd          Frechet distance of the prior's tokens to held-out real tokens (diffusion.metrics.distances, the
                code behind tools/evaluate.py's fd_NAME), with its bootstrap interval; beside two baselines:
                a Gaussian fitted to the training tokens (the best FD any model matching two moments gets; it
                lacks the fine structure that precision/recall see) and PixCell's null condition (one point:
                what "unconditional" sampling conditions on); with the baselines' margins over the prior
                (fd_gaussian_minus_fd, fd_null_minus_fd) from one bootstrap that shares the held-out tokens
    precision   k-NN precision and recall (Kynkaanniemi et al. 2019, "Improved precision and recall"): the
    recall      share of samples inside the k-NN balls of the real tokens, and of real tokens inside the
                samples' balls
    nn_train    distance of each sample to its nearest training token, against the same distance for held-out
                real tokens: a prior that copies its training set (useless for privacy) has samples much closer
                to the training tokens than unseen real tokens are (ratio of medians << 1, many "copies")

Tokens are compared one by one (a 16-token grid is 16 points), as UNI2-h FDs of images are. Per label when the
prior and the held-out tokens are labelled.
"""

from __future__ import annotations

import numpy as np
import torch

from ..metrics.distances import compare_frechet_distances


def _pairwise_min(
    a: np.ndarray, b: np.ndarray, offset: np.ndarray | None = None, chunk: int = 4096
) -> np.ndarray:
    """min_j (||a_i - b_j|| - offset_j) for every row of a, in chunks (never the full |a| x |b| matrix)."""
    bt = torch.from_numpy(np.ascontiguousarray(b, np.float32))
    off = torch.from_numpy(offset.astype(np.float32)) if offset is not None else None
    out = []
    for i in range(0, len(a), chunk):
        d = torch.cdist(torch.from_numpy(np.ascontiguousarray(a[i : i + chunk], np.float32)), bt)
        out.append((d - off if off is not None else d).min(dim=1).values)
    return torch.cat(out).numpy()


def knn_radii(feats: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Distance of each row to its k-th nearest other row (the radius of its k-NN ball)."""
    if len(feats) <= k:
        raise ValueError(f"k-NN radii: {len(feats)} points, need more than k = {k}")
    ft = torch.from_numpy(np.ascontiguousarray(feats, np.float32))
    out = []
    for i in range(0, len(ft), chunk):
        d = torch.cdist(ft[i : i + chunk], ft)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # column 0 is the point itself
    return torch.cat(out).numpy()


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Sec. 2), k = 3 as in the paper."""
    precision = float((_pairwise_min(fake, real, knn_radii(real, k)) <= 0).mean())
    recall = float((_pairwise_min(real, fake, knn_radii(fake, k)) <= 0).mean())
    return precision, recall


def nearest_distances(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance of each point to its nearest reference point."""
    return _pairwise_min(points, reference)


def memorisation(samples: np.ndarray, train: np.ndarray, heldout: np.ndarray) -> dict[str, float]:
    """Nearest-training distances of the samples against those of held-out real tokens."""
    d_syn, d_real = nearest_distances(samples, train), nearest_distances(heldout, train)
    copy_radius = float(np.percentile(d_real, 1))  # closer than 99% of unseen real tokens: a near-copy
    return {
        "nn_train_median_samples": float(np.median(d_syn)),
        "nn_train_median_heldout": float(np.median(d_real)),
        "nn_train_ratio": float(np.median(d_syn) / max(np.median(d_real), 1e-12)),
        "near_copies": float((d_syn < copy_radius).mean()),
    }


def token_rows(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, T, C) or (N, C) -> (N*T, C) float64 rows."""
    a = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    return a.reshape(-1, a.shape[-1]).astype(np.float64)


def prior_metrics(
    samples: np.ndarray,  # (N, C) rows of the prior's tokens
    heldout: np.ndarray,  # (M, C) held-out real tokens
    train: np.ndarray,  # (K, C) training tokens
    null: np.ndarray | None = None,  # (T, C) PixCell's null condition, as a baseline
    k: int = 3,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Every number of the module docstring for one set of samples (float dict, JSON-able)."""
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}

    gaussian = rng.multivariate_normal(
        train.mean(0), np.cov(train, rowvar=False), size=len(samples), method="eigh"
    )
    sets = {"fd": samples, "fd_gaussian": gaussian}
    if null is not None:
        # The null condition is one fixed token set: its rows, tiled to the sample count, are a point mass
        # (per token position) whose FD is |mu_real - null|^2 + tr(Sigma_real).
        reps = -(-len(samples) // len(null))
        sets["fd_null"] = np.tile(null, (reps, 1))[: len(samples)]
    # One bootstrap for the three, the held-out tokens drawn once per resample: the baselines' margins over the
    # prior (fd_gaussian_minus_fd, fd_null_minus_fd; > 0: the prior is closer) keep the reference's noise out.
    comparison = compare_frechet_distances(sets, heldout, n_boot=n_boot, seed=seed)
    for name in sets:
        est = comparison.estimate(name)
        out.update(
            {name: est.value, f"{name}_low": est.low, f"{name}_high": est.high, f"{name}_std": est.std}
        )
        if name != "fd":
            margin = comparison.difference(name, "fd")
            out.update(
                {
                    f"{name}_minus_fd": margin.value,
                    f"{name}_minus_fd_low": margin.low,
                    f"{name}_minus_fd_high": margin.high,
                }
            )
    out["precision"], out["recall"] = knn_precision_recall(heldout, samples, k)
    out["precision_gaussian"], out["recall_gaussian"] = knn_precision_recall(heldout, gaussian, k)
    out.update(memorisation(samples, train, heldout))
    out["n_samples"], out["n_heldout"], out["n_train"] = len(samples), len(heldout), len(train)
    return out
