"""Frechet distance, KID and paired cosine on feature arrays: closed forms, clean-fid agreement, invariants."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from cleanfid.fid import frechet_distance as cleanfid_frechet
from cleanfid.fid import kernel_distance as cleanfid_kernel

from diffusion.metrics.distances import (
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
    kernel_distance,
    paired_cosine,
    summarize_cosine,
)


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_closed_form_commuting_covariances():
    # S1 = R diag(a) R^T, S2 = R diag(b) R^T commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    d = 6
    r = _rotation(d, 0)
    a, b = np.linspace(0.5, 3.0, d), np.linspace(4.0, 0.1, d)
    mu1, mu2 = np.arange(d, dtype=float), np.arange(d, dtype=float)[::-1] * 0.5
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, r @ np.diag(a) @ r.T, mu2, r @ np.diag(b) @ r.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_general_covariances_match_textbook_formula():
    rng = np.random.default_rng(1)
    d = 5
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    root = scipy.linalg.sqrtm(s1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(root @ s2 @ root).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_frechet_of_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    d, n = 3, 40_000
    r = _rotation(d, 3)
    a, b = np.array([1.0, 2.0, 0.5]), np.array([0.3, 1.5, 2.5])
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.25])
    x1 = rng.normal(size=(n, d)) * np.sqrt(a) @ r.T + mu1
    x2 = rng.normal(size=(n, d)) * np.sqrt(b) @ r.T + mu2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # 2.95...
    assert frechet_distance_from_features(x1, x2) == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("n1,n2,d", [(300, 400, 16), (10, 14, 32), (40, 40, 40)])
def test_frechet_agrees_with_clean_fid(n1, n2, d):
    rng = np.random.default_rng(n1 + d)
    f1 = rng.normal(size=(n1, d))
    f2 = rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.4 + 0.3
    mu1, s1 = gaussian_stats(f1)
    mu2, s2 = gaussian_stats(f2)
    reference = cleanfid_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    # the low-rank route (fewer images than dimensions) and the covariance route give the same number
    assert frechet_distance_from_features(f1, f2) == pytest.approx(reference, rel=1e-6)


def test_frechet_identical_sets_is_zero_and_shift_adds_squared_norm():
    f = np.random.default_rng(4).normal(size=(50, 8))
    assert frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-9)
    few = f[:5]  # low-rank path
    assert frechet_distance_from_features(few, few) == pytest.approx(0.0, abs=1e-9)
    shift = np.full(8, 0.5)
    assert frechet_distance_from_features(f, f + shift) == pytest.approx(shift @ shift, rel=1e-9)


def test_frechet_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance_from_features(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_from_features(np.full((5, 4), np.nan), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_kid_matches_clean_fid_and_is_seeded():
    rng = np.random.default_rng(5)
    f1, f2 = rng.normal(size=(60, 16)), rng.normal(size=(50, 16)) + 0.5
    ours = kernel_distance(f1, f2, num_subsets=20, max_subset_size=30, seed=7)
    state = np.random.get_state()
    np.random.seed(7)
    reference = cleanfid_kernel(f1, f2, num_subsets=20, max_subset_size=30)
    np.random.set_state(state)
    assert ours == pytest.approx(reference, rel=1e-12)
    assert kernel_distance(f1, f2, 20, 30, seed=7) == ours
    # the global numpy RNG is left as it was
    before = np.random.get_state()[1].copy()
    kernel_distance(f1, f2, 5, 30, seed=1)
    assert np.array_equal(np.random.get_state()[1], before)
    # two samples of one distribution score far below two distributions one unit apart
    g1, g2 = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same = kernel_distance(g1, g2, 50, 100, seed=0)
    apart = kernel_distance(g1, g2 + 1.0, 50, 100, seed=0)
    assert abs(same) < apart / 10


def test_paired_cosine_and_summary():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(20, 8))
    assert np.allclose(paired_cosine(real, 3 * real), 1.0)
    assert np.allclose(paired_cosine(real, -real), -1.0)
    other = rng.normal(size=(20, 8))
    expected = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(real, other)]
    cos = paired_cosine(real, other)
    assert np.allclose(cos, expected)
    s = summarize_cosine(cos)
    assert s.n_pairs == 20 and s.min <= s.p05 <= s.median <= s.p95 <= s.max
    assert s.mean == pytest.approx(np.mean(expected))
    with pytest.raises(ValueError, match="shapes differ"):
        paired_cosine(real, other[:10])


def test_frechet_bootstrap_value_is_the_full_sample_distance_and_the_interval_tracks_sample_size():
    from diffusion.metrics.distances import frechet_distance_bootstrap

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 4)), rng.normal(size=(400, 4)) + 1.0  # d^2 = 4 in the limit
    est = frechet_distance_bootstrap(a, b, n_boot=100, seed=1)
    assert est.value == frechet_distance_from_features(a, b)
    assert est.low < est.value < est.high and est.std > 0
    assert est.low < 4.0 < est.high
    assert frechet_distance_bootstrap(a, b, n_boot=100, seed=1) == est  # seeded: reproducible
    small = frechet_distance_bootstrap(a[:50], b[:50], n_boot=100, seed=1)
    assert small.high - small.low > 2 * (est.high - est.low)  # 8x fewer images, a much wider interval
    with pytest.raises(ValueError, match="ci=1.5"):
        frechet_distance_bootstrap(a, b, ci=1.5)


def test_comparison_with_a_small_shared_reference_separates_sets_its_single_intervals_cannot():
    from diffusion.metrics.distances import compare_frechet_distances, frechet_distance_bootstrap

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(10, 4))  # a demo-sized reference: 10 held-out tiles
    near = rng.normal(size=(200, 4)) + 0.5  # d^2 = 4 * 0.25 = 1 in the limit
    far = rng.normal(size=(200, 4)) + 1.0  # d^2 = 4
    cmp = compare_frechet_distances({"near": near, "far": far}, reference, n_boot=300, seed=2)
    assert cmp.values == {"near": frechet_distance_from_features(near, reference),
                          "far": frechet_distance_from_features(far, reference)}  # fmt: skip
    near_alone = frechet_distance_bootstrap(near, reference, n_boot=300, seed=2)
    far_alone = frechet_distance_bootstrap(far, reference, n_boot=300, seed=2)
    assert near_alone.high > far_alone.low  # one at a time, the two intervals overlap
    diff = cmp.difference("far", "near")
    assert diff.value == pytest.approx(cmp.values["far"] - cmp.values["near"])
    assert diff.low > 0  # over shared resamples of the reference, "near" is surely the closer set
    assert diff.high - diff.low < 0.75 * (far_alone.high - far_alone.low)
    assert cmp.difference("near", "far").high == pytest.approx(-diff.low)
    assert cmp.estimate("near").value == cmp.values["near"] and cmp.estimate("near").std > 0
    again = compare_frechet_distances({"near": near, "far": far}, reference, n_boot=300, seed=2)
    assert again.difference("far", "near") == diff  # seeded: reproducible
    with pytest.raises(ValueError, match="no feature sets"):
        compare_frechet_distances({}, reference)
    with pytest.raises(ValueError, match="feature sizes differ"):
        compare_frechet_distances({"near": near[:, :3]}, reference)
    with pytest.raises(ValueError, match="'far'.*NaN"):
        compare_frechet_distances({"far": np.full((5, 4), np.nan)}, reference)


def test_frechet_bootstrap_std_shrinks_with_more_images_and_the_value_tracks_a_scaled_covariance():
    from diffusion.metrics.distances import frechet_distance_bootstrap

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2000, 4)), rng.standard_normal((2000, 4)) * 1.2 + 0.5
    est = frechet_distance_bootstrap(a, b, n_boot=100, seed=1)
    # d^2 = |0.5|^2 * 4 + 4 (1 + 1.44 - 2 * 1.2) = 1.16 in the limit; the covariance term enters, not only the mean
    assert abs(est.value - (4 * 0.25 + 4 * (1 + 1.44 - 2 * 1.2))) < 0.15
    assert est.high - est.low < 0.5
    small = frechet_distance_bootstrap(a[:40], b[:40], n_boot=100, seed=1)
    assert small.std > 2 * est.std  # the spread, not only the interval, narrows with more images
