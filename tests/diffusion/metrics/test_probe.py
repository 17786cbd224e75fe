"""The linear probe: scores equal scikit-learn's, F1 ~1 on separable features, chance on shuffled labels, CIs
that cover their estimates, a paired gain that shows when synthetic data carries signal, and tools.probe end to
end on the real slide's tiles with its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score

from diffusion.command import run_cli
from diffusion.metrics.probe import LabelledFeatures, run_probe, scores, stratified_subset
from tools.probe import main


def _blobs(n_per_class: int, sep: float, seed: int, prefix: str = "img", d: int = 16) -> LabelledFeatures:
    """Two Gaussian classes `sep` apart along the first axis; keys `<class>/<prefix><i>`."""
    rng = np.random.default_rng(seed)
    feats, labels, keys = [], [], []
    for c, name in enumerate(("a", "b")):
        x = rng.normal(size=(n_per_class, d))
        x[:, 0] += sep * c
        feats.append(x)
        labels += [name] * n_per_class
        keys += [f"{name}/{prefix}{i}" for i in range(n_per_class)]
    return LabelledFeatures(np.concatenate(feats), np.array(labels), tuple(keys))


def _row(report: dict, train: str, fraction: float = 1.0) -> dict:
    return next(r for r in report["results"] if r["train"] == train and r["fraction"] == fraction)


def test_scores_match_scikit_learn():
    rng = np.random.default_rng(0)
    for n_classes in (2, 4):
        y, p = rng.integers(0, n_classes, 50), rng.integers(0, n_classes, 50)
        p[:3] = 0  # class 3 may be absent from one side: both conventions must agree there too
        f1, bacc = scores(y, p, n_classes)
        assert f1 == pytest.approx(f1_score(y, p, average="macro"))
        assert bacc == pytest.approx(balanced_accuracy_score(y, p))
    subset = stratified_subset(np.array([0] * 10 + [1] * 3), 0.1, np.random.default_rng(0))
    assert len(subset) == 2 and set(np.array([0] * 10 + [1] * 3)[subset]) == {0, 1}  # at least one per class


def test_separable_features_give_f1_one_and_the_ci_covers_the_estimate():
    report = run_probe(
        _blobs(40, 12.0, 0, d=4), _blobs(40, 12.0, 1, d=4), fractions=[0.5, 1.0], seeds=3, n_boot=200
    )
    for f in (0.5, 1.0):
        row = _row(report, "real", f)
        for metric in ("f1", "bacc"):
            est = row[metric]
            assert est["value"] > 0.97
            assert est["low"] <= est["value"] <= est["high"]
    assert _row(report, "real", 0.5)["n_real"] == 40  # half of 40 per class, two classes


def test_shuffled_labels_give_chance_within_the_ci():
    train, test = _blobs(60, 3.0, 0), _blobs(60, 3.0, 1)
    # Labels shuffled over the whole data set (train and test): they no longer depend on the features, so any
    # probe is at chance on the test labels, and the CI over test images must say so.
    rng = np.random.default_rng(5)
    train_s, test_s = (LabelledFeatures(d.feats, rng.permutation(d.labels), d.keys) for d in (train, test))
    row = _row(run_probe(train_s, test_s, seeds=3, n_boot=300), "real")
    assert row["bacc"]["low"] <= 0.5 <= row["bacc"]["high"]
    assert row["f1"]["low"] <= 0.5 <= row["f1"]["high"]
    assert row["f1"]["high"] - row["f1"]["low"] < 0.4  # an informative interval, not [0, 1]
    informed = _row(run_probe(train, test, seeds=3, n_boot=300), "real")
    assert informed["bacc"]["low"] > 0.8  # the same data with its labels is far above chance


def test_synthetic_variants_follow_their_sources_and_a_real_gain_is_significant():
    # Few real images (fraction 0.05 -> 2 per class) of a noisy problem; each has 10 synthetic variants drawn
    # from its class's distribution, named after it as tools/augment.py names them.
    train, test = _blobs(40, 1.5, 0, d=32), _blobs(200, 1.5, 1, d=32)
    rng = np.random.default_rng(2)
    syn_keys, syn_labels, syn_feats = [], [], []
    for key, label in zip(train.keys, train.labels):
        for k in range(10):
            x = rng.normal(size=32)
            x[0] += 1.5 * (label == "b")
            syn_keys.append(f"{key}_{k}")
            syn_labels.append(label)
            syn_feats.append(x)
    syn = LabelledFeatures(np.array(syn_feats), np.array(syn_labels), tuple(syn_keys))
    report = run_probe(train, test, {"aug": syn}, fractions=[0.05], seeds=4, n_boot=300)
    assert _row(report, "real+syn:aug", 0.05)["n_syn"] == 10 * _row(report, "real", 0.05)["n_real"]
    (cmp,) = report["comparisons"]
    assert cmp["f1_gain"]["value"] > 0.05 and cmp["f1_gain"]["low"] > 0 and cmp["p_f1"] < 0.05
    # Synthetic images that repeat the real ones add nothing: no significant gain.
    same = LabelledFeatures(train.feats.copy(), train.labels, tuple(f"{k}_0" for k in train.keys))
    (cmp,) = run_probe(train, test, {"copy": same}, fractions=[0.05], seeds=4, n_boot=300)["comparisons"]
    assert cmp["f1_gain"]["low"] <= 0 <= cmp["f1_gain"]["high"] and cmp["p_f1"] > 0.05


@pytest.fixture()
def folders(tmp_path, slide_tiles) -> Path:
    """train/ and test/ from the real slide's tiles, labelled by a pixel rule (dark vs light tiles), 64 px."""
    tiles = sorted(slide_tiles, key=lambda t: t[1].mean())
    half = len(tiles) // 2
    for i, (rc, image) in enumerate(tiles):
        split = "train" if i % 3 else "test"
        cls = "dark" if i < half else "light"
        path = tmp_path / split / cls / f"{rc[0]}_{rc[1]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((64, 64)).save(path)
    return tmp_path


def test_probe_cli_on_slide_tiles_and_one_line_errors(folders, tiny_uni_dir, tmp_path, capsys):
    out = tmp_path / "report"
    base = ["--encoder", f"uni2={tiny_uni_dir}", "--seeds", "2", "--n-boot", "50", "--num-workers", "0",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    argv = ["--train", str(folders / "train"), "--test", str(folders / "test"), "--synthetic",
            str(folders / "train"), "--fractions", "0.5", "1", "--out", str(out), *base]  # fmt: skip
    assert run_cli(main, argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    res = metrics["encoders"]["uni2"]
    assert {r["train"] for r in res["results"]} == {"real", "real+syn:train", "syn:train"}
    assert res["classes"] == ["dark", "light"] and len(res["comparisons"]) == 2
    assert "macro-F1" in (out / "report.md").read_text()
    assert Image.open(out / "report.png").format == "PNG"
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # train (also the synthetic set) and test

    def error(*extra: str) -> str:
        capsys.readouterr()
        assert run_cli(main, [*extra, "--out", str(tmp_path / "o"), *base]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    (folders / "test" / "other").mkdir()
    assert "class folder 'other' holds no images" in error(
        "--train", str(folders / "train"), "--test", str(folders / "test")
    )
    Image.new("RGB", (64, 64)).save(folders / "test" / "other" / "x.png")
    assert "--test: class 'other' is not in --train" in error(
        "--train", str(folders / "train"), "--test", str(folders / "test")
    )
