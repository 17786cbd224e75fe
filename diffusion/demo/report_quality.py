"""The demo report's encoder-free sections: the morphology table beside the stand-in UNI distances, and seams."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SHOWN = ("nuclei_density", "nuclear_fraction", "edge_density", "eosin_haematoxylin", "texture")
UNI_NAMES = {"trained": "trained", "untrained": "untrained"}  # morphology set -> seeds.json entry


def _ci(d: dict, signed: bool = False) -> str:
    f = "+.1f" if signed else ".1f"
    return f"{d['value']:{f}} [{d['low']:{f}}, {d['high']:{f}}]"


def _reading(a: str, b: str, d: dict) -> str:
    if d["low"] > 0:
        return f"{html.escape(b)} closer"
    if d["high"] < 0:
        return f"{html.escape(a)} closer"
    return "no clear difference"


def morphology_html(morph: dict | None, seeds: dict) -> str:
    """Per set: morphology FD [95% CI], stand-in UNI FD [95% CI] where the set has one, and the medians of the
    features a reader checks first (nuclei, edges, eosin/haematoxylin), real first."""
    if not morph:
        return ""
    feats = morph["features"]
    cols = [feats.index(f) for f in SHOWN]
    head = "".join(f"<th>{f.replace('_', ' ')}</th>" for f in SHOWN)
    real = "".join(f"<td>{morph['real']['median'][j]:.3g}</td>" for j in cols)
    rows = f"<tr><td>held-out real ({morph['real']['n']})</td><td>0</td><td>&ndash;</td>{real}</tr>"
    for name, s in morph["sets"].items():
        uni = seeds.get(UNI_NAMES.get(name, ""), {}).get("fd_pooled")
        uni_cell = _ci(uni) if uni else "&ndash;"
        medians = "".join(f"<td>{s['median'][j]:.3g}</td>" for j in cols)
        rows += f"<tr><td>{html.escape(name)} ({s['n']})</td><td>{_ci(s['fd'])}</td><td>{uni_cell}</td>{medians}</tr>"
    diffs = "".join(
        f"<tr><td>FD({html.escape(a)}) &minus; FD({html.escape(b)})</td><td>{_ci(d, True)}</td>"
        f"<td>{_reading(a, b, d)}</td></tr>"
        for a, b, d in ((*name.split(" - "), d) for name, d in morph["differences"].items())
    )
    t = morph["thresholds"]
    return f"""<h3>Morphology, no encoder (diffusion/metrics/morphology.py)</h3>
<p>Per image: stain optical densities by colour deconvolution, tissue fraction, nuclei (objects of haematoxylin OD
above {t["nuclei_h"]:.3f}, the darkest 15% of the held-out tiles' tissue, set on them and applied to every set),
edge density (mean Sobel magnitude over tissue), texture (mean |Laplacian|) and JPEG blockiness. The Frechet
distance is over the features standardised by the held-out tiles' mean and std, with a 95% bootstrap interval
(both sets resampled); the stand-in UNI distance pools every seed (eval/seeds.json). Medians per set
(images in brackets):</p>
<table><tr><th>set</th><th>morphology FD &darr;</th><th>stand-in UNI FD &darr;</th>{head}</tr>{rows}</table>
<p>Differences over the same resamples (the held-out tiles drawn once per resample):</p>
<table><tr><th>difference</th><th>value [95% CI]</th><th>reading</th></tr>{diffs}</table>"""


def seams_html(seams: dict | None) -> str:
    if not seams:
        return ""
    parts = []
    for key, what in (("window", "window grid"), ("stride", "stride grid (every window border)")):
        if key in seams:
            g, r = seams[key]["generated"], seams[key]["real"]
            parts.append(
                f"at the {seams[key]['period_px']} px {what}: generated {g['columns']:.2f} (columns) / "
                f"{g['rows']:.2f} (rows), real region {r['columns']:.2f} / {r['rows']:.2f}"
            )
    return (
        "<p>Seams: the mean pixel step across window borders over the mean step elsewhere (1 = no seam; "
        f"diffusion/metrics/seams.py), {'; '.join(parts)}.</p>"
    )


def morphology_panel(ax: Axes, morph: dict, seeds: dict) -> None:
    """Bars of morphology FD per set with their intervals, the stand-in UNI FD as text on top where known."""
    names = list(morph["sets"])
    values = [morph["sets"][n]["fd"]["value"] for n in names]
    low = [v - morph["sets"][n]["fd"]["low"] for n, v in zip(names, values, strict=True)]
    high = [morph["sets"][n]["fd"]["high"] - v for n, v in zip(names, values, strict=True)]
    ax.bar(
        range(len(names)), values, yerr=[[max(x, 0) for x in low], [max(x, 0) for x in high]], color="#7b4f9d"
    )
    for i, n in enumerate(names):
        uni = seeds.get(UNI_NAMES.get(n, ""), {}).get("fd_pooled")
        if uni:
            ax.text(i, values[i], f"UNI {uni['value']:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names], fontsize=8)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title(
        "morphology FD to held-out tiles (no encoder; lower is better)\n95% bootstrap; stand-in UNI FD on top"
    )
