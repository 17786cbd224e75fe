"""The evaluation report: metrics.json, report.md (Markdown tables), report.png (figure), pairs.csv.

Every file is written to a temporary name and renamed (diffusion.atomic), so a report folder never holds a
half-written file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from diffusion.atomic import atomic_path, atomic_write_bytes

_DESCRIPTIONS = {
    "fd": "Frechet distance",
    "kid": "KID",
    "cos": "mean cosine, real vs synthetic twin",
}


def _sizes(folder: dict) -> str:
    """' of 256x256 px' (or ' of 256x256 (90), 512x512 (10) px'); '' for a report written before sizes were."""
    sizes = folder.get("sizes") or {}
    if not sizes:
        return ""
    if len(sizes) == 1:
        return f" of {next(iter(sizes))} px"
    return " of " + ", ".join(f"{k} ({v})" for k, v in sizes.items()) + " px"


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write the report files into `out_dir`; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "markdown": out / "report.md", "figure": out / "report.png"}
    public = {k: v for k, v in report.items() if k != "pairs"}  # per-pair values go to pairs.csv
    atomic_write_bytes(paths["json"], (json.dumps(public, indent=2) + "\n").encode())
    atomic_write_bytes(paths["markdown"], render_markdown(report).encode())
    _write_figure(report, paths["figure"])
    if report.get("pairs"):
        paths["pairs"] = out / "pairs.csv"
        atomic_write_bytes(paths["pairs"], _pairs_csv(report["pairs"]).encode())
    return paths


def _fmt(name: str, value: float) -> str:
    if name == "kid" or name.startswith("kid_"):
        return f"{value:.6f}"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3e}"
    return f"{value:.4f}"


def _features_label(name: str, report: dict) -> str:
    encoder = "inception" if name in ("fid", "kid") else name.split("_", 1)[1]
    info = report["encoders"].get(encoder, {})
    if encoder == "inception":
        return f"Inception-v3 pool3, clean-fid mode=clean ({info.get('dim', 2048)}-d)"
    return f"{encoder}: {info.get('arch')}, {info.get('input_size')} px, pool={info.get('pool')} ({info.get('dim')}-d)"


def render_markdown(report: dict) -> str:
    real, syn = report["real"], report["syn"]
    lines = [
        "# PixCell evaluation",
        "",
        f"- REAL: `{real['path']}` ({real['num_images']} images{_sizes(real)}, content hash `{real['content_hash'][:12]}`)",
        f"- SYN: `{syn['path']}` ({syn['num_images']} images{_sizes(syn)}, content hash `{syn['content_hash'][:12]}`)",
        "",
        "| Metric | Value | What | Features |",
        "|---|---:|---|---|",
    ]
    for name, value in report["metrics"].items():
        if name == "morphology":  # no encoder: its own table below
            m = report["morphology"]["frechet"]
            lines.append(
                f"| {name} | {_fmt(name, value)} [{m['low']:.3g}, {m['high']:.3g}] | Frechet distance (95% CI) | "
                "standardised stain, nuclei and sharpness features, no encoder |"
            )
            continue
        kind = "fd" if name == "fid" else "kid" if name == "kid" else name.split("_", 1)[0]
        lines.append(
            f"| {name} | {_fmt(name, value)} | {_DESCRIPTIONS[kind]} | {_features_label(name, report)} |"
        )
    if report["cosine"]:
        lines += [
            "",
            "## Conditional fidelity: cosine similarity of each real image and its synthetic twin",
            "",
            "| Encoder | mean | std | median | p05 | p95 | min | max | pairs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for enc, s in report["cosine"].items():
            stats = " | ".join(f"{s[k]:.4f}" for k in ("mean", "std", "median", "p05", "p95", "min", "max"))
            lines.append(f"| {enc} | {stats} | {s['n_pairs']} |")
    if report.get("morphology"):
        m = report["morphology"]
        lines += [
            "",
            f"## Morphology (no encoder; nuclei threshold: haematoxylin OD > {m['thresholds']['nuclei_h']:.4f}, "
            "set on REAL)",
            "",
            "| Feature | REAL median | SYN median | Wasserstein-1 |",
            "|---|---:|---:|---:|",
        ]
        for row in m["features"]:
            lines.append(
                f"| {row['name']} | {row['real_median']:.4g} | {row['syn_median']:.4g} | {row['wasserstein']:.4g} |"
            )
    if report["encoders"]:
        lines += [
            "",
            "## Encoders",
            "",
            "| Name | Source | Architecture | Input | Mean / std | Pool | dtype | Dim |",
            "|---|---|---|---|---|---|---|---:|",
        ]
    for enc, info in report["encoders"].items():
        norm = f"{info['mean']} / {info['std']}" if "mean" in info else "(x - 128) / 128"
        lines.append(
            f"| {enc} | `{info['source']}` | {info['arch']} | {info['input_size']} px, {info['resize']} | {norm} "
            f"| {info.get('pool', 'pool3')} | {info.get('dtype', 'float32')} | {info['dim']} |"
        )
    if report["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    s = report["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items())
    lines += [
        "",
        f"Device {s['device']}, dtype {s['dtype']}, KID {s['kid_subsets']} subsets of <= {s['kid_subset_size']} "
        f"(seed {s['seed']}); {versions}; {s['date']}.",
        "",
    ]
    return "\n".join(lines)


def _write_figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fd = {n: v for n, v in report["metrics"].items() if n in ("fid", "morphology") or n.startswith("fd_")}
    what = "Frechet distance"
    pairs = (report.get("pairs") or {}).get("cosine", {})
    if not fd and not pairs:  # only KID asked for: bars of KIDs instead
        fd, what = dict(report["metrics"]), "KID"
    panels = int(bool(fd)) + int(bool(pairs))
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax_iter = iter(axes[0])
    if fd:
        ax = next(ax_iter)
        labels = ["inception" if n in ("fid", "kid") else n.split("_", 1)[-1] for n in fd]
        bars = ax.bar(labels, list(fd.values()), color="#7b4f9d")
        ax.bar_label(bars, labels=[_fmt(n, v) for n, v in fd.items()], fontsize=8)
        ax.set_ylabel(f"{what} (lower is better)")
        ax.set_title(f"{what} per encoder")
        if len(fd) > 1 and min(fd.values()) > 0 and max(fd.values()) > 100 * min(fd.values()):
            ax.set_yscale("log")  # Inception FID and encoder FDs live on very different scales
        else:
            ax.set_ylim(0, max(fd.values()) * 1.15 or 1.0)  # distances are >= 0; all-zero still draws an axis
    if pairs:
        ax = next(ax_iter)
        everything = [v for values in pairs.values() for v in values]
        lo, hi = min(everything), max(everything)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, min(50, max(6, len(everything) // 4)) + 1)
        for enc, values in pairs.items():  # shared bins, so encoders are comparable at a glance
            ax.hist(values, bins=bins, alpha=0.5, label=f"{enc} (mean {np.mean(values):.3f})")
        ax.set_xlabel("cosine similarity, real vs synthetic twin")
        ax.set_ylabel("pairs")
        ax.set_title("Conditional fidelity")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _pairs_csv(pairs: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    encoders = list(pairs["cosine"])
    writer.writerow(["name"] + [f"cos_{e}" for e in encoders])
    for i, key in enumerate(pairs["keys"]):
        writer.writerow([key] + [f"{pairs['cosine'][e][i]:.6f}" for e in encoders])
    return buffer.getvalue()
