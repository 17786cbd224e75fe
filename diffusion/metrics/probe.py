"""Linear probes on frozen encoder features: does adding synthetic images to a small labelled set help?

The protocol of the PixCell paper's augmentation experiment (Sec. 4.3, Fig. 3c): embed labelled real images
with a frozen pathology encoder, train a logistic-regression probe on real features only, on real + synthetic
(the synthetic variants of the same training images, with their labels) and on synthetic only, and score
each on the same held-out real test set. Here at several training fractions (augmentation matters most when
real labels are scarce) and several seeds (each draws its own stratified subset of the training images).

Statistics. For one (encoder, training set, fraction) the score is the mean over seeds of macro-F1 (and
balanced accuracy) on the test set. Its 95% CI is a percentile bootstrap over test images (the seed-mean
recomputed on each resample); the gain of real + synthetic over real is bootstrapped *paired* (both probes
scored on the same resample), and its two-sided p-value is 2 min(P(gain <= 0), P(gain >= 0)) over resamples.
The CI covers test-set sampling noise; the spread over seeds (training-subset noise) is reported beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusion.metrics.cache import FeatureCache
from diffusion.metrics.features import FeatureExtractor
from diffusion.sampling.augment import variant_source

MODES = ("real", "real+syn", "syn")


@dataclass(frozen=True)
class LabelledFeatures:
    """Features (N, D) of a labelled image set, labels (N,) as class names, keys (N,) as image keys."""

    feats: np.ndarray
    labels: np.ndarray
    keys: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)


def labelled_features(
    root: str | Path,
    flag: str,
    extractor: FeatureExtractor,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> LabelledFeatures:
    """Embed a labelled folder `root/<class>/...` (classes from the first path part), cached like
    tools/evaluate.py's features (`FeatureCache`, keyed by folder content and encoder fingerprint)."""
    from diffusion.metrics.features import embed_images
    from diffusion.metrics.images import content_hash, list_images
    from diffusion.sampling.augment import class_folders

    class_folders(root, flag)  # one-line errors for empty class folders and images outside class folders
    folder = list_images(root, flag)

    def compute() -> np.ndarray:
        return embed_images(extractor, folder, batch_size, num_workers, progress)

    if cache is None:
        feats = compute()
    else:
        feats, _ = cache.get_or_compute(folder, content_hash(folder, progress), extractor, compute)
    labels = np.array([k.split("/", 1)[0] for k in folder.keys])
    return LabelledFeatures(feats, labels, folder.keys)


#################################################################################
#                            Scores, vectorised over resamples                  #
#################################################################################


def scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Macro-F1 and balanced accuracy of integer labels (..., N) -> two arrays of shape (...).

    As scikit-learn defines them: macro-F1 averages F1 over the classes present in y_true or y_pred (F1 = 2TP /
    (2TP + FP + FN)); balanced accuracy averages recall over the classes present in y_true. Written with
    counts so that a thousand bootstrap resamples cost one array operation instead of a thousand calls.
    """
    y_true, y_pred = np.broadcast_arrays(y_true, y_pred)
    f1_sum, f1_n, rec_sum, rec_n = (np.zeros(y_true.shape[:-1]) for _ in range(4))
    for c in range(n_classes):
        t, p = y_true == c, y_pred == c
        tp = (t & p).sum(-1)
        n_true, n_pred = t.sum(-1), p.sum(-1)
        present = (n_true + n_pred) > 0
        f1_sum += np.where(present, 2 * tp / np.maximum(n_true + n_pred, 1), 0)
        f1_n += present
        rec_sum += np.where(n_true > 0, tp / np.maximum(n_true, 1), 0)
        rec_n += n_true > 0
    return f1_sum / np.maximum(f1_n, 1), rec_sum / np.maximum(rec_n, 1)


@dataclass(frozen=True)
class Estimate:
    """A score with its percentile bootstrap CI and the standard deviation over seeds."""

    value: float
    low: float
    high: float
    seed_std: float

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "seed_std": self.seed_std}


#################################################################################
#                                     Probe                                     #
#################################################################################


def stratified_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of `fraction` of each class (at least one image per class), sorted."""
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(idx))))
        picked.append(rng.choice(idx, size=min(n, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))


def _fit_predict(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, c: float, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y)) == 1:  # one class in the subset: logistic regression cannot fit, it predicts it
        return np.full(len(x_test), y[0])
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    return probe.fit(x, y).predict(x_test)


def check_classes(train: LabelledFeatures, test: LabelledFeatures, synthetic: Mapping[str, LabelledFeatures]):
    """Every test (and synthetic) class must be a training class: one line naming the first that is not."""
    known = set(train.labels.tolist())
    for role, data in (("--test", test), *((f"--synthetic {n}", s) for n, s in synthetic.items())):
        missing = sorted(set(data.labels.tolist()) - known)
        if missing:
            raise ValueError(
                f"{role}: class '{missing[0]}' is not in --train (classes there: {', '.join(sorted(known))})"
            )


def run_probe(
    train: LabelledFeatures,
    test: LabelledFeatures,
    synthetic: Mapping[str, LabelledFeatures] | None = None,
    fractions: Sequence[float] = (1.0,),
    seeds: int = 3,
    n_boot: int = 1000,
    ci: float = 0.95,
    c: float = 1.0,
    seed: int = 0,
) -> dict:
    """Probe every training set at every fraction; -> {"results": [...], "comparisons": [...], "classes"}.

    results rows: {"train": "real" | "real+syn:NAME" | "syn:NAME", "fraction", "n_real", "n_syn",
    "f1": Estimate dict, "bacc": Estimate dict}. comparisons rows: {"synthetic": NAME, "fraction",
    "f1_gain": {"value", "low", "high"}, "bacc_gain": {...}, "p_f1", "p_bacc"} for real+syn - real.
    Synthetic images named `<class>/<stem>_<k>` after a training image (tools/augment.py's names) follow
    their source into a subset; a synthetic set with no such link is subsampled at the same fraction.
    """
    synthetic = dict(synthetic or {})
    check_classes(train, test, synthetic)
    if not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"--fractions {list(fractions)}: expected values in (0, 1]")
    if seeds < 1 or n_boot < 10:
        raise ValueError(f"--seeds {seeds} / --n-boot {n_boot}: expected >= 1 / >= 10")
    classes = sorted(set(train.labels.tolist()))
    code = {name: i for i, name in enumerate(classes)}
    y_train = np.array([code[v] for v in train.labels])
    y_test = np.array([code[v] for v in test.labels])
    train_keys = set(train.keys)
    links = {
        name: np.array([variant_source(k, train_keys) or "" for k in s.keys]) for name, s in synthetic.items()
    }

    # preds[(train set, fraction)] = (seeds, N_test) predictions; sizes alongside
    preds: dict[tuple[str, float], list[np.ndarray]] = {}
    sizes: dict[tuple[str, float], tuple[int, int]] = {}
    for f in fractions:
        for s in range(seeds):
            rng = np.random.default_rng([seed, s, int(round(f * 1e6))])
            idx = stratified_subset(y_train, f, rng)
            x_r, y_r = train.feats[idx], y_train[idx]
            runs = {"real": (x_r, y_r, 0)}
            chosen = {train.keys[i] for i in idx}
            for name, syn in synthetic.items():
                y_s_all = np.array([code[v] for v in syn.labels])
                if (links[name] != "").any():
                    keep = np.flatnonzero(np.isin(links[name], list(chosen)))
                else:
                    keep = stratified_subset(y_s_all, f, rng)
                x_s, y_s = syn.feats[keep], y_s_all[keep]
                runs[f"real+syn:{name}"] = (np.concatenate([x_r, x_s]), np.concatenate([y_r, y_s]), len(keep))
                if len(keep):
                    runs[f"syn:{name}"] = (x_s, y_s, len(keep))
            for label, (x, y, n_syn) in runs.items():
                preds.setdefault((label, f), []).append(_fit_predict(x, y, test.feats, c, s))
                sizes[(label, f)] = (len(x) - n_syn if not label.startswith("syn:") else 0, n_syn)

    rng = np.random.default_rng(seed)
    boot = rng.integers(0, len(y_test), size=(n_boot, len(y_test)))  # shared by every probe: paired
    q = (50 * (1 - ci), 50 * (1 + ci))
    results, per_boot = [], {}
    for (label, f), p in preds.items():
        p = np.stack(p)  # (S, N)
        f1_s, bacc_s = scores(y_test[None], p, len(classes))  # (S,)
        f1_b, bacc_b = scores(y_test[boot][:, None], p[:, boot].transpose(1, 0, 2), len(classes))  # (B, S)
        per_boot[(label, f)] = (f1_b.mean(1), bacc_b.mean(1))
        row = {"train": label, "fraction": f, "n_real": sizes[(label, f)][0], "n_syn": sizes[(label, f)][1]}
        for metric, point, b in (("f1", f1_s, f1_b), ("bacc", bacc_s, bacc_b)):
            low, high = np.percentile(b.mean(1), q)
            row[metric] = Estimate(float(point.mean()), float(low), float(high), float(point.std())).to_dict()
        results.append(row)

    comparisons = []
    for name in synthetic:
        for f in fractions:
            if (f"real+syn:{name}", f) not in per_boot:
                continue
            row: dict = {"synthetic": name, "fraction": f}
            for k, metric in enumerate(("f1", "bacc")):
                gain_b = per_boot[(f"real+syn:{name}", f)][k] - per_boot[("real", f)][k]
                point = (
                    _row(results, f"real+syn:{name}", f)[metric]["value"]
                    - _row(results, "real", f)[metric]["value"]
                )
                low, high = np.percentile(gain_b, q)
                row[f"{metric}_gain"] = {"value": point, "low": float(low), "high": float(high)}
                row[f"p_{metric}"] = float(min(1.0, 2 * min((gain_b <= 0).mean(), (gain_b >= 0).mean())))
            comparisons.append(row)
    return {"classes": classes, "results": results, "comparisons": comparisons, "n_test": len(y_test)}


def _row(results: list[dict], label: str, fraction: float) -> dict:
    return next(r for r in results if r["train"] == label and r["fraction"] == fraction)


#################################################################################
#                                     Report                                    #
#################################################################################


def report_markdown(report: dict) -> str:
    """report.md: one table of scores per encoder and the gains of real + synthetic over real."""
    lines = ["# Linear-probe report", ""]
    s = report["settings"]
    lines += [
        f"Train {s['train']} ({s['n_train']} images), test {s['test']} ({s['n_test']} images), classes "
        f"{', '.join(s['classes'])}; fractions {s['fractions']}, {s['seeds']} seed(s), {s['n_boot']} bootstrap "
        "resamples of the test set; logistic regression on standardised frozen features.",
        "",
        "Scores: mean over seeds, [95% bootstrap CI over test images], (std over seeds).",
        "",
    ]
    for enc, out in report["encoders"].items():
        lines += [
            f"## {enc}",
            "",
            "| train on | fraction | real | syn | macro-F1 | balanced acc. |",
            "|---|---|---|---|---|---|",
        ]
        for r in out["results"]:
            f1, ba = r["f1"], r["bacc"]
            lines.append(
                f"| {r['train']} | {r['fraction']:g} | {r['n_real']} | {r['n_syn']} | {f1['value']:.3f} "
                f"[{f1['low']:.3f}, {f1['high']:.3f}] ({f1['seed_std']:.3f}) | {ba['value']:.3f} "
                f"[{ba['low']:.3f}, {ba['high']:.3f}] ({ba['seed_std']:.3f}) |"
            )
        if out["comparisons"]:
            lines += [
                "",
                "| real + syn vs real | fraction | F1 gain [95% CI] | p | bal. acc. gain [95% CI] | p |",
                "|---|---|---|---|---|---|",
            ]
            for c in out["comparisons"]:
                g, b = c["f1_gain"], c["bacc_gain"]
                lines.append(
                    f"| {c['synthetic']} | {c['fraction']:g} | {g['value']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] "
                    f"| {c['p_f1']:.3g} | {b['value']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}] | {c['p_bacc']:.3g} |"
                )
        lines.append("")
    return "\n".join(lines)


def report_figure(report: dict, path: str | Path) -> None:
    """report.png: macro-F1 against the training fraction, one panel per encoder, CI bands per training set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = list(report["encoders"])
    fig, axes = plt.subplots(1, len(encoders), figsize=(5 * len(encoders), 3.6), squeeze=False)
    for ax, enc in zip(axes[0], encoders):
        rows = report["encoders"][enc]["results"]
        for label in dict.fromkeys(r["train"] for r in rows):
            pts = sorted((r["fraction"], r["f1"]) for r in rows if r["train"] == label)
            x = [p[0] for p in pts]
            ax.plot(x, [p[1]["value"] for p in pts], marker="o", label=label)
            ax.fill_between(x, [p[1]["low"] for p in pts], [p[1]["high"] for p in pts], alpha=0.2)
        if len({r["fraction"] for r in rows}) > 1:
            ax.set_xscale("log")
        ax.set_xlabel("fraction of real training images")
        ax.set_ylabel("macro-F1 on real test set")
        ax.set_title(enc)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
