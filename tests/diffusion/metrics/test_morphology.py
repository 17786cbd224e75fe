"""The encoder-free morphology measure (diffusion/metrics/morphology.py) on the real slide's tiles: known
degradations move it monotonically with their strength, two halves of one real set sit near zero."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffusion.metrics.morphology import (
    FEATURES,
    compare_features,
    compare_morphology,
    fit_thresholds,
    image_features,
    morphology_features,
)


@pytest.fixture(scope="module")
def crops(slide_tiles) -> list[np.ndarray]:
    """128 px quadrants of the slide's tissue tiles (80 real images, in row-major tile order)."""
    return [t[y : y + 128, x : x + 128] for _, t in slide_tiles for y in (0, 128) for x in (0, 128)]


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(sigma)))


def jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def hue(a: np.ndarray, degrees: float) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(a).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + round(degrees / 360 * 256)) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def stain_normalised(a: np.ndarray, strength: float) -> np.ndarray:
    """A copy moved towards another lab's stain (paler eosin, stronger haematoxylin) by colour deconvolution:
    strength 1 is the fully normalised copy, 0 the original."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(a)
    target = hed * np.array([1.3, 0.4, 1.0])
    out = hed2rgb((1 - strength) * hed + strength * target)
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


DEGRADATIONS = {
    "blur": (blur, [0.7, 1.5, 3.0]),
    "hue": (hue, [10, 30, 60]),
    "jpeg": (jpeg, [30, 8, 3]),
    "stain": (stain_normalised, [0.33, 0.67, 1.0]),
}


def test_degradations_are_ordered_by_strength(crops):
    real = crops[::2]  # 40 images
    thresholds = fit_thresholds(real)
    feats = morphology_features(real, thresholds)
    sets = {
        f"{name}{level}": morphology_features([fn(a, level) for a in real], thresholds)
        for name, (fn, levels) in DEGRADATIONS.items()
        for level in levels
    }
    result = compare_features(feats, sets, thresholds, n_boot=20)
    for name, (_, levels) in DEGRADATIONS.items():
        values = [result[f"{name}{level}"].frechet.value for level in levels]
        assert values == sorted(values) and values[0] < values[-1], (name, values)
    # the strongest of each is far from the real set (a halves comparison is < 5, below)
    assert min(result[f"{n}{lv[-1]}"].frechet.value for n, (_, lv) in DEGRADATIONS.items()) > 8


def test_two_halves_of_real_set_score_near_zero(crops):
    a, b = crops[::2], crops[1::2]
    result = compare_morphology(a, b, n_boot=50)
    assert result.frechet.value < 5, result.frechet
    assert result.frechet.low <= result.frechet.value * 3 + 1
    strong_blur = compare_morphology(a, [blur(x, 3.0) for x in b], n_boot=10)
    assert strong_blur.frechet.value > 10 * result.frechet.value
    # per feature: the same threshold for both, medians close, table complete
    assert [r.name for r in result.rows] == list(FEATURES)
    nuclei = next(r for r in result.rows if r.name == "nuclei_density")
    assert nuclei.real_median > 0 and abs(nuclei.syn_median / nuclei.real_median - 1) < 0.35


def test_features_of_blank_and_bad_images():
    thresholds = fit_thresholds([np.full((32, 32, 3), (150, 60, 160), np.uint8)] * 2)
    glass = image_features(np.full((32, 32, 3), 245, np.uint8), thresholds)
    assert glass.shape == (len(FEATURES),) and glass[0] == 0 and glass[4] == 0
    with pytest.raises(ValueError, match="no tissue"):
        fit_thresholds([np.full((8, 8, 3), 250, np.uint8)])
    with pytest.raises(ValueError, match="RGB"):
        image_features(np.zeros((8, 8)), thresholds)
    with pytest.raises(ValueError, match="at least 2"):
        compare_morphology([glass], [glass])
