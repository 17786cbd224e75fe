"""The audit's report.md and report.png: distance histograms, synthetic against held-out, and the closest pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffusion.audit.images import ImageSet


def report_markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        "# Memorisation audit",
        "",
        f"{s['n_synthetic']} synthetic images against {s['n_train']} training images"
        + (f", with {s['n_reference']} held-out real images as the yardstick." if s["n_reference"] else "."),
        "",
        f"- **flagged as copies: {s['flagged']}** (pixel NCC >= {s['settings']['pixel_threshold']} over "
        f"flips, 90-degree rotations and shifts up to {s['settings']['max_shift']} px against the "
        f"{s['settings']['k']} nearest training images per encoder)",
        f"- suspect (closer in encoder space than any held-out image, no pixel copy): {s['suspect']}",
        f"- held-out images over the pixel threshold: {s['reference_flagged']} (should be 0)",
        f"- feature search: {s['settings']['search_backend']}",
        "",
        "| encoder | synthetic -> train distance (min / median) | held-out -> train (min / median) | "
        "synthetic closer than any held-out |",
        "|---|---|---|---|",
    ]
    for e, v in s["encoders"].items():
        syn, ref = v["synthetic_distance"], v["reference_distance"]
        ref_txt = f"{ref['min']:.4f} / {ref['median']:.4f}" if ref else "-"
        closer = v["closer_than_any_reference"]
        lines.append(
            f"| {e} | {syn['min']:.4f} / {syn['median']:.4f} | {ref_txt} | {'-' if closer is None else closer} |"
        )
    px = s["pixel_ncc"]
    lines += [
        "",
        f"Pixel NCC to the best candidate: synthetic median {px['synthetic']['median']:.3f}, max "
        f"{px['synthetic']['max']:.3f}"
        + (
            f"; held-out median {px['reference']['median']:.3f}, max {px['reference']['max']:.3f}"
            if px["reference"]
            else ""
        )
        + ".",
    ]
    sl = s["slide_level"]
    if sl:
        lines += [
            "",
            f"Slide level ({sl['encoder']} space, {sl['n_train_slides']} training slide(s)): nearest "
            "training image from the image's own slide:",
        ]
        for role in ("synthetic", "reference"):
            if role in sl:
                r = sl[role]
                lines.append(f"- {role}: {r['rate']:.1%} ({r['same_slide']}/{r['known']})")
    for w in s["warnings"]:
        lines += ["", f"**warning**: {w}"]
    flagged = [r for r in result["per_image"] if r["flagged"] or r["suspect"]]
    if flagged:
        lines += ["", "| synthetic | nearest training image | flagged | reason |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['nearest_train']} | {r['flagged']} | {r['reason']} |" for r in flagged]
    return "\n".join(lines) + "\n"


def report_figure(result: dict, train: ImageSet, synthetic: ImageSet, path: Path, n_pairs: int = 4) -> None:
    """Histograms (first encoder's distance, pixel NCC) and the n closest pairs by pixel NCC, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    enc = next(iter(s["encoders"]))
    rows, ref = result["per_image"], result["reference"]
    fig = plt.figure(figsize=(14, 4.2))
    for col, (title, key) in enumerate(
        (
            (f"{enc}: cosine distance to nearest training image", f"{enc}_distance"),
            ("pixel NCC to best candidate", "pixel_ncc"),
        )
    ):
        ax = fig.add_subplot(1, 3, col + 1)
        syn_v = [r["scores"][key] for r in rows]
        ref_v = [r["scores"][key] for r in ref]
        bins = np.linspace(min(syn_v + ref_v), max(syn_v + ref_v) + 1e-6, 25)
        ax.hist(syn_v, bins=bins, alpha=0.6, label=f"synthetic -> train ({len(syn_v)})")
        if ref_v:
            ax.hist(ref_v, bins=bins, alpha=0.6, label=f"held-out -> train ({len(ref_v)})")
        if key == "pixel_ncc":
            ax.axvline(s["settings"]["pixel_threshold"], color="red", ls="--", label="copy threshold")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 3, 3)
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["scores"]["pixel_ncc"])[:n_pairs]
    tile = 96
    canvas = np.full((tile * max(1, len(order)), 2 * tile + 4, 3), 255, np.uint8)
    train_pos = {k: i for i, k in enumerate(train.keys)}
    for r, i in enumerate(order):
        for c, img in enumerate(
            (synthetic.image(i), train.image(train_pos[rows[i]["scores"]["pixel_match"]]))
        ):
            from PIL import Image

            small = np.asarray(Image.fromarray(img).resize((tile, tile)))
            canvas[r * tile : (r + 1) * tile, c * (tile + 4) : c * (tile + 4) + tile] = small
    ax.imshow(canvas)
    ax.set_title("closest pairs: synthetic | training (by pixel NCC)", fontsize=10)
    ax.set_yticks([tile * (r + 0.5) for r in range(len(order))])
    ax.set_yticklabels([f"{rows[i]['scores']['pixel_ncc']:.2f}" for i in order], fontsize=8)
    ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)
