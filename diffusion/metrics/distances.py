"""Distances between two sets of image features: Frechet distance, KID, paired cosine similarity.

Every encoder (Inception, UNI2-h, any timm model) goes through these functions, so the numbers for different
feature spaces differ only in the features. Features are (N, D) arrays, one row per image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np

#################################################################################
#                               Frechet distance                                #
#################################################################################


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64 (what FID fits to each set)."""
    feats = _check_feats(feats, "features", min_rows=2)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance; tiny negative eigenvalues (round-off) are clipped to 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1^1/2 sigma2 sigma1^1/2)^1/2)  (Dowson & Landau 1982).
    Written with symmetric eigendecompositions instead of `scipy.linalg.sqrtm(sigma1 @ sigma2)` (clean-fid,
    pytorch-fid): sqrt(S1) S2 sqrt(S1) is symmetric PSD, so its trace-sqrt is exact and real, with no
    imaginary round-off to discard, also for the rank-deficient covariances of small sets.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"Frechet distance: shapes do not match (means {mu1.shape} vs {mu2.shape}, "
            f"covariances {sigma1.shape} vs {sigma2.shape})"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return _clean(diff @ diff, np.trace(sigma1) + np.trace(sigma2), tr_covmean)


def frechet_distance_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N1, D) and (N2, D).

    With fewer images than dimensions (small evaluations, 2048-d Inception features) the covariances have rank
    < D and the trace term equals the nuclear norm of A B^T, A = centred feats1 / sqrt(N1-1) (likewise B):
    the nonzero eigenvalues of S1^1/2 S2 S1^1/2 are those of (A B^T)(A B^T)^T. That costs an N1 x N2 SVD
    instead of D x D eigendecompositions and gives the same number.
    """
    feats1 = _check_feats(feats1, "first feature set", min_rows=2)
    feats2 = _check_feats(feats2, "second feature set", min_rows=2)
    if feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"Frechet distance: feature sizes differ ({feats1.shape[1]} vs {feats2.shape[1]})")
    n1, n2, d = len(feats1), len(feats2), feats1.shape[1]
    if max(n1, n2) >= d:
        return frechet_distance(*gaussian_stats(feats1), *gaussian_stats(feats2))
    mu1, mu2 = feats1.mean(axis=0), feats2.mean(axis=0)
    a = (feats1 - mu1) / np.sqrt(n1 - 1)  # sigma1 = a.T @ a
    b = (feats2 - mu2) / np.sqrt(n2 - 1)  # sigma2 = b.T @ b
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return _clean(diff @ diff, (a * a).sum() + (b * b).sum(), tr_covmean)


def _clean(mean_term: float, trace_sum: float, tr_covmean: float) -> float:
    """d^2 = mean_term + trace_sum - 2 tr_covmean, with round-off below float64 precision of the terms read as 0
    (identical sets give +-1e-22 otherwise, which a report would print as a distance)."""
    fd = float(mean_term + trace_sum - 2 * tr_covmean)
    return 0.0 if fd < 1e-12 * float(mean_term + trace_sum) else fd


@dataclass(frozen=True)
class FrechetEstimate:
    """A Frechet distance with its sampling spread: `value` on the full sets, `low`/`high` the percentile
    confidence interval and `std` the standard deviation over bootstrap resamples of both sets."""

    value: float
    low: float
    high: float
    std: float


def frechet_distance_bootstrap(
    feats_a: np.ndarray, feats_b: np.ndarray, n_boot: int = 200, seed: int = 0, ci: float = 0.95
) -> FrechetEstimate:
    """Frechet distance of two feature sets with a bootstrap confidence interval.

    Each resample draws both sets with replacement (the two are independent samples), so the interval covers
    the sampling noise of both; at a few hundred images per set FD moves by more than many reported gains.
    Resamples hold repeated rows, which lower the covariance rank a little and bias FD upward: the interval
    is a spread, `value` (the full-sample distance) the estimate to compare.
    """
    feats_a = _check_feats(feats_a, "first feature set", min_rows=2)
    feats_b = _check_feats(feats_b, "second feature set", min_rows=2)
    # the one-set case of the shared-reference bootstrap: each draw resamples feats_a, then feats_b
    return compare_frechet_distances({"a": feats_a}, feats_b, n_boot, seed, ci).estimate("a")


def _estimate(value: float, boots: np.ndarray, ci: float) -> FrechetEstimate:
    low, high = np.percentile(boots, [50 * (1 - ci), 50 * (1 + ci)])
    return FrechetEstimate(value=float(value), low=float(low), high=float(high), std=float(boots.std(ddof=1)))


@dataclass(frozen=True)
class FrechetComparison:
    """Several feature sets' Frechet distances to one reference, with a bootstrap that shares the reference.

    `values[name]`: the full-sample distance; `boots[name]`: its value on each resample. In every resample the
    reference is drawn once and each set on its own, so a difference of two sets' distances keeps the reference's
    sampling noise out: with a small reference (a demo's 10 held-out tiles) each distance moves a lot from one
    resample to the next, but mostly together, and `difference` is tighter than the individual intervals suggest."""

    values: dict[str, float]
    boots: dict[str, np.ndarray]
    ci: float

    def estimate(self, name: str) -> FrechetEstimate:
        """FD(name) to the reference with its interval."""
        return _estimate(self.values[name], self.boots[name], self.ci)

    def difference(self, a: str, b: str) -> FrechetEstimate:
        """FD(a) - FD(b) with its interval over the same resamples (> 0: `b` is closer to the reference)."""
        return _estimate(self.values[a] - self.values[b], self.boots[a] - self.boots[b], self.ci)


def compare_frechet_distances(
    sets: Mapping[str, np.ndarray], reference: np.ndarray, n_boot: int = 200, seed: int = 0, ci: float = 0.95
) -> FrechetComparison:
    """Frechet distance of each of `sets` (name -> (N, D) features) to `reference` (M, D), with the shared-reference
    bootstrap of FrechetComparison: which of several generators is closer to the real images, and how surely."""
    reference = _check_feats(reference, "reference features", min_rows=2)
    sets = {name: _check_feats(f, f"features of {name!r}", min_rows=2) for name, f in sets.items()}
    if not sets:
        raise ValueError("compare_frechet_distances: no feature sets to compare")
    if not 0 < ci < 1 or n_boot < 2:
        raise ValueError(f"bootstrap: ci={ci} must be in (0, 1) and n_boot={n_boot} >= 2")
    values = {name: frechet_distance_from_features(f, reference) for name, f in sets.items()}
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {name: [] for name in sets}
    for _ in range(n_boot):  # each draw: every set resampled on its own, then the reference once for all
        draws = {name: f[rng.integers(0, len(f), len(f))] for name, f in sets.items()}
        ref = reference[rng.integers(0, len(reference), len(reference))]
        for name, f in draws.items():
            boots[name].append(frechet_distance_from_features(f, ref))
    return FrechetComparison(values, {name: np.array(b) for name, b in boots.items()}, ci)


#################################################################################
#                          Kernel Inception Distance                            #
#################################################################################


@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """clean-fid's KID draws subsets from numpy's global RNG: seed it for reproducibility, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def kernel_distance(
    feats1: np.ndarray,
    feats2: np.ndarray,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged over subsets.

    Delegates to clean-fid's `kernel_distance` (same subsets, same kernel as its `compute_kid`), seeded.
    """
    from cleanfid.fid import kernel_distance as cleanfid_kernel_distance

    feats1 = _check_feats(feats1, "first feature set", min_rows=2)
    feats2 = _check_feats(feats2, "second feature set", min_rows=2)
    if feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"KID: feature sizes differ ({feats1.shape[1]} vs {feats2.shape[1]})")
    with _numpy_seed(seed):
        return float(cleanfid_kernel_distance(feats1, feats2, num_subsets, max_subset_size))


#################################################################################
#                       Paired (conditional) cosine similarity                  #
#################################################################################


@dataclass(frozen=True)
class CosineSummary:
    """Distribution of per-pair cosine similarities (real image vs its synthetic twin)."""

    mean: float
    std: float
    median: float
    p05: float
    p95: float
    min: float
    max: float
    n_pairs: int

    def to_dict(self) -> dict:
        return asdict(self)


def paired_cosine(feats_real: np.ndarray, feats_syn: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) and (N, D) features -> (N,); row i of each is one pair."""
    feats_real = _check_feats(feats_real, "real features", min_rows=1)
    feats_syn = _check_feats(feats_syn, "synthetic features", min_rows=1)
    if feats_real.shape != feats_syn.shape:
        raise ValueError(f"paired cosine: shapes differ ({feats_real.shape} vs {feats_syn.shape})")
    norms = np.linalg.norm(feats_real, axis=1) * np.linalg.norm(feats_syn, axis=1)
    return (feats_real * feats_syn).sum(axis=1) / np.maximum(norms, 1e-12)


def summarize_cosine(cos: np.ndarray) -> CosineSummary:
    cos = np.asarray(cos, np.float64)
    p05, median, p95 = np.percentile(cos, [5, 50, 95])
    return CosineSummary(
        mean=float(cos.mean()),
        std=float(cos.std()),
        median=float(median),
        p05=float(p05),
        p95=float(p95),
        min=float(cos.min()),
        max=float(cos.max()),
        n_pairs=len(cos),
    )


def _check_feats(feats: np.ndarray, what: str, min_rows: int) -> np.ndarray:
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2:
        raise ValueError(f"{what}: expected an (N, D) array, got shape {feats.shape}")
    if len(feats) < min_rows:
        raise ValueError(f"{what}: needs at least {min_rows} images, got {len(feats)}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{what}: contains NaN or inf (check the encoder and its dtype)")
    return feats
