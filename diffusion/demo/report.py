"""The CPU demo's report: `report.html` (self-contained, images inlined) and `report.png` (one figure)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffusion.atomic import atomic_path, atomic_write_bytes
from diffusion.demo.report_quality import morphology_html, morphology_panel, seams_html

STAGES = (
    "slide",
    "patches",
    "encoders",
    "features",
    "train",
    "untrained",
    "sample",
    "evaluate",
    "large",
    "augment",
    "probe",
    "audit",
    "prior",
    "quality",
)


def write_large_reference(slide_path: Path, out: Path, size: int) -> Path:
    """The most tissue-rich size x size square of the slide (level 0), as the large region's reference."""
    from diffusion.data.slides import open_slide, read_rgb

    if out.is_file():
        return out
    slide, _ = open_slide(slide_path)
    w, h = slide.dimensions
    thumb = np.asarray(slide.get_thumbnail((w // 16, h // 16)).convert("HSV"))[..., 1].astype(np.float32)
    s = size // 16
    best, best_xy = -1.0, (0, 0)
    for y in range(0, thumb.shape[0] - s + 1, 4):
        for x in range(0, thumb.shape[1] - s + 1, 4):
            score = float((thumb[y : y + s, x : x + s] > 30).mean())
            if score > best:
                best, best_xy = score, (x * 16, y * 16)
    with atomic_path(out) as tmp:
        read_rgb(slide, best_xy[0], best_xy[1], 0, size).save(tmp, format="PNG")
    return out


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _img_tag(image: Image.Image, width: int | None = None) -> str:
    data = base64.b64encode(_png_bytes(image)).decode()
    style = f' style="width:{width}px"' if width else ""
    return f'<img src="data:image/png;base64,{data}"{style}>'


def _labelled_grid(columns: list[tuple[str, list[Image.Image]]], tile: int = 128) -> Image.Image:
    """Columns of equally sized tiles under a header row of labels."""
    rows = max(len(c) for _, c in columns)
    grid = Image.new("RGB", (tile * len(columns), 18 + tile * rows), "white")
    draw = ImageDraw.Draw(grid)
    for j, (label, images) in enumerate(columns):
        draw.text((j * tile + 4, 3), label, fill="black")
        for i, im in enumerate(images):
            grid.paste(im.convert("RGB").resize((tile, tile)), (j * tile, 18 + i * tile))
    return grid


def loss_curve(work_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, loss) from the training run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, values = [], []
    for events in sorted((work_dir / "tensorboard").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        tag = next((t for t in acc.Tags()["scalars"] if t.endswith("loss")), None)
        if tag:
            for e in acc.Scalars(tag):
                steps.append(e.step)
                values.append(e.value)
        break
    return steps, values


def _vae_example(out: Path, tile_path: Path) -> Image.Image:
    """A held-out tile beside its reconstruction by the demo's VAE stand-in."""
    import torch

    from diffusion.encoders import decode_latents, encode_posterior, latents_to_model, load_vae

    vae = load_vae(out / "standins" / "vae-standin")
    image = torch.from_numpy(np.array(Image.open(tile_path).convert("RGB"))).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        mean, _ = encode_posterior(vae, image)
        rec = decode_latents(vae, latents_to_model(mean, vae))[0]
    rec_img = Image.fromarray((rec.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return _labelled_grid([("held-out tile", [Image.open(tile_path)]), ("VAE stand-in", [rec_img])], 192)


def _figure(
    pairs: Image.Image,
    curve: tuple[list[int], list[float]],
    metrics: dict,
    large: Image.Image | None,
    path: Path,
    morphology: dict | None = None,
    seeds: dict | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(20, 11))
    ax = fig.add_axes([0.01, 0.02, 0.40, 0.93])
    ax.imshow(pairs)
    ax.set_title("held-out real | VAE stand-in reconstruction | trained PixCell | untrained")
    ax.axis("off")
    ax = fig.add_axes([0.45, 0.56, 0.22, 0.36])
    if curve[0]:
        ax.plot(curve[0], curve[1], lw=1)
    ax.set_title("training loss (hybrid: eps MSE + VLB)")
    ax.set_xlabel("step")
    ax = fig.add_axes([0.45, 0.08, 0.22, 0.36])
    if morphology:
        morphology_panel(ax, morphology, seeds or {})
    else:
        names = list(metrics)
        fd = [metrics[n].get("fd_uni2", float("nan")) for n in names]
        ax.bar(names, fd, color=["tab:green", "tab:gray"][: len(names)])
        ax.set_title("Frechet distance to held-out tiles\n(stand-in UNI space; lower is better)")
    ax = fig.add_axes([0.70, 0.08, 0.29, 0.84])
    if large is not None:
        ax.imshow(large)
    ax.set_title("sliding-window region (generated)")
    ax.axis("off")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _metric_caveat(metrics: dict) -> str:
    """Say so when the stand-in feature space ranks the untrained model's noise above the trained samples."""
    fd = {n: m.get("fd_uni2", float("nan")) for n, m in metrics.items()}
    if fd.get("trained", 0) < fd.get("untrained", 0):
        return ""
    return (
        "<p><b>Caveat:</b> in this run the stand-in UNI space ranks the untrained model's noise closer to the "
        "real tiles than the trained model's samples: a tiny encoder trained for a minute is a weak judge. "
        "With UNI2-h (or any trained encoder, <code>--encoder</code>) the metrics measure what they should. "
        "Look at the images.</p>"
    )


def _seeds_html(out: Path) -> str:
    """Distances over every seed: pooled FD with its bootstrap CI, and the per-seed spread."""
    path = out / "eval" / "seeds.json"
    if not path.is_file():
        return ""
    seeds = json.loads(path.read_text())
    rows = ""
    for name, d in seeds.items():
        fd, per, cos = d["fd_pooled"], d["fd_per_seed"], np.array(d["cos_per_seed"])
        rows += (
            f"<tr><td>{html.escape(name)}</td><td>{fd['value']:.1f} [{fd['low']:.1f}, {fd['high']:.1f}]</td>"
            f"<td>{min(per):.1f} &ndash; {max(per):.1f}</td><td>{cos.mean():.3f} &plusmn; {cos.std():.3f}</td>"
            f"<td>{d['n_real']} / {d['n_syn']}</td></tr>"
        )
    n_seeds = len(next(iter(seeds.values()))["fd_per_seed"])
    return (
        f"<h3>Over {n_seeds} seeds per held-out condition</h3><p>The same distances with every sample: FD of all "
        "seeds' images pooled against the held-out tiles, with a 95% bootstrap interval (both sets resampled), "
        "and the range of the per-seed FDs and paired cosines: a difference smaller than these spreads is noise."
        "</p><table><tr><th>model</th><th>FD, all seeds [95% CI]</th><th>FD per seed (min &ndash; max)</th>"
        f"<th>paired cosine per seed (mean &plusmn; sd)</th><th>real / synthetic</th></tr>{rows}</table>"
    )


def _probe_html(out: Path, labels: dict) -> str:
    path = out / "eval" / "probe" / "metrics.json"
    if not path.is_file():
        return ""
    res = json.loads(path.read_text())["encoders"]["uni2"]
    rows = "".join(
        f"<tr><td>{html.escape(r['train'])}</td><td>{r['fraction']:g}</td><td>{r['n_real']} + {r['n_syn']}</td>"
        f"<td>{r['f1']['value']:.3f} [{r['f1']['low']:.3f}, {r['f1']['high']:.3f}]</td>"
        f"<td>{r['bacc']['value']:.3f} [{r['bacc']['low']:.3f}, {r['bacc']['high']:.3f}]</td></tr>"
        for r in res["results"]
    )
    gains = "".join(
        f"<tr><td>{c['fraction']:g}</td><td>{c['f1_gain']['value']:+.3f} [{c['f1_gain']['low']:+.3f}, "
        f"{c['f1_gain']['high']:+.3f}]</td><td>{c['p_f1']:.3g}</td></tr>"
        for c in res["comparisons"]
    )
    counts = ", ".join(f"{k} {v}" for k, v in labels.get("counts", {}).items())
    figure = out / "eval" / "probe" / "report.png"
    return f"""<h2>Augmentation and a linear probe (tools/augment.py, tools/probe.py)</h2>
<p>Labels by a rule that owes nothing to any encoder: the haematoxylin channel of colour deconvolution
(<code>skimage.color.rgb2hed</code>), thresholded by Otsu over the training tiles (OD {labels.get("h_threshold", float("nan")):.3f}),
gives each tile's nuclear density; tiles at or above the median ({labels.get("density_cut", float("nan")):.3f}) are
<i>cellular</i>, the others <i>stromal</i>; every third tile of each class is a test tile ({counts}). tools/augment.py made
synthetic variants of every training tile from its own UNI tokens, in its class folder; tools/probe.py trained
logistic-regression probes on the stand-in UNI features (5 seeds per fraction) and scored them on the test tiles: mean
over seeds [95% bootstrap CI over test tiles].</p>
<table><tr><th>trained on</th><th>fraction</th><th>real + synthetic images</th><th>macro-F1</th><th>balanced accuracy</th></tr>{rows}</table>
<p>Real + synthetic against real only (paired bootstrap over the same test tiles):</p>
<table><tr><th>fraction</th><th>F1 gain [95% CI]</th><th>p</th></tr>{gains}</table>
<p>With {res["n_test"]} test tiles the intervals are wide: at demo scale these numbers show the protocol, not a gain.
{_chance_note(res)}</p>
{_img_tag(Image.open(figure)) if figure.is_file() else ""}"""


def _chance_note(res: dict) -> str:
    """Say so when even the real-only probe on all training tiles is not above chance (its CI reaches 0.5)."""
    full = [r for r in res["results"] if r["train"] == "real" and r["fraction"] == 1.0]
    if not full or full[0]["bacc"]["low"] > 0.5:
        return ""
    return (
        "Here even the probe on all real training tiles is not above chance (balanced accuracy CI reaches 0.5): the "
        "stand-in encoder's features barely see nuclear density, so there is no signal for synthetic data to add. "
        "With UNI2-h (<code>--encoder uni2</code>) the same commands measure the real effect."
    )


def _audit_html(out: Path) -> str:
    path = out / "eval" / "audit" / "audit.json"
    if not path.is_file():
        return ""
    s = json.loads(path.read_text())["summary"]
    enc = next(iter(s["encoders"].values()))
    syn_d, ref_d = enc["synthetic_distance"], enc["reference_distance"]
    px = s["pixel_ncc"]
    sl = s.get("slide_level") or {}
    slide = ""
    if sl.get("reference"):
        slide = (
            f"<p>Slide level: the demo has {sl['n_train_slides']} slide, so every nearest neighbour is from the "
            "image's own slide; with many slides, tools/audit.py compares that rate for synthetic and held-out "
            "images.</p>"
        )
    figure = out / "eval" / "audit" / "report.png"
    return f"""<h2>Memorisation audit (tools/audit.py)</h2>
<p>The {s["n_synthetic"]} synthetic variants (conditioned on training tiles: the likeliest to copy them) against the
{s["n_train"]} training tiles, with the {s["n_reference"]} held-out tiles as the yardstick. <b>Flagged as copies:
{s["flagged"]}</b>; suspect (closer in encoder space than any held-out tile): {s["suspect"]}. Cosine distance to the
nearest training tile (stand-in UNI): synthetic min {syn_d["min"]:.4f} / median {syn_d["median"]:.4f}, held-out
min {ref_d.get("min", float("nan")):.4f} / median {ref_d.get("median", float("nan")):.4f}. Best pixel NCC over flips,
rotations and shifts: synthetic max {px["synthetic"]["max"]:.3f}, held-out max {px["reference"].get("max", float("nan")):.3f}
(copy threshold {s["settings"]["pixel_threshold"]}).</p>{slide}
{_img_tag(Image.open(figure)) if figure.is_file() else ""}"""


def _closer(a: str, b: str, d: dict) -> str:
    """What an interval of FD(a) - FD(b) says: which set is closer to the held-out tiles, or neither surely."""
    if d["low"] > 0:
        return f"{b} closer"
    if d["high"] < 0:
        return f"{a} closer"
    return "no clear difference"


def _prior_html(out: Path, prior: dict | None) -> str:
    """Images from no reference (prior samples) beside conditional and null-condition ones, with their FDs."""
    if not prior:
        return ""
    samples = out / "samples_prior"
    step = prior["seeds_per_condition"]  # the conditional set holds each held-out tile's images side by side
    columns = [("held-out real", [Image.open(p) for p in sorted((samples / "real").glob("*.png"))[:8]])]
    columns += [
        (name, [Image.open(p) for p in sorted((samples / name / "syn").glob("*.png"))[::step][:8]])
        for name in ("conditional", "prior", "null")
    ]
    grid = _labelled_grid(columns)
    with atomic_path(samples / "grid.png") as tmp:  # the same figure as a file (docs/prior.md shows it)
        grid.save(tmp, format="PNG")
    fd = prior["fd_images"]
    rows = "".join(
        f"<tr><td>{n}</td><td>{m['n_images']}</td><td>{m['value']:.1f}</td><td>[{m['low']:.1f}, {m['high']:.1f}]</td>"
        f"<td>{m['std']:.1f}</td></tr>"
        for n, m in fd["sets"].items()
    )
    diffs = "".join(
        f"<tr><td>FD({a}) &minus; FD({b})</td><td>{d['value']:+.1f}</td><td>[{d['low']:+.1f}, {d['high']:+.1f}]</td>"
        f"<td>{_closer(a, b, d)}</td></tr>"
        for a, b, d in ((*name.split(" - "), d) for name, d in fd["differences"].items())
    )
    u = prior["uni_space"]
    return f"""<h2>Generation without a reference image (UNI prior)</h2>
<p>A UNI prior (train_scripts/train_prior.py) trained on the training tiles' stand-in UNI tokens draws the
conditions of the "prior" column: no real image is involved. Beside it: a held-out tile, an image conditioned on
its own tokens ({prior["seeds_per_condition"]} seeds each in the measurement), and one from PixCell's null condition.
The prior and null images are not paired with the tile in their row.</p>
{_img_tag(grid)}
<table><tr><th>set</th><th>images</th><th>FD to held-out tiles (stand-in UNI) &darr;</th><th>95% bootstrap</th>
<th>bootstrap std</th></tr>{rows}</table>
<p>The {fd["n_reference"]} held-out tiles move all three distances together from one bootstrap draw to the next; the
differences, over the same draws (the reference resampled once per draw), are what tell the sets apart:</p>
<table><tr><th>difference</th><th>value</th><th>95% bootstrap</th><th>reading</th></tr>{diffs}</table>
<p>The prior in UNI space (tools/evaluate_prior.py, tokens only, against the 10 held-out tiles): FD
{u["fd"]:.1f} [{u["fd_low"]:.1f}, {u["fd_high"]:.1f}] against {u["fd_gaussian"]:.1f} for a Gaussian fitted to the
training tokens (its margin over the prior, on the same resamples: {u["fd_gaussian_minus_fd"]:+.1f}
[{u["fd_gaussian_minus_fd_low"]:+.1f}, {u["fd_gaussian_minus_fd_high"]:+.1f}]) and {u.get("fd_null", float("nan")):.1f} for the null condition; k-NN precision {u["precision"]:.2f},
recall {u["recall"]:.2f}; nearest-training distance of the samples / of held-out tiles {u["nn_train_ratio"]:.2f}
(&lt;&lt; 1 would mean copies of the {u["n_train"]} training tokens).</p>"""


def _stage_info(done_dir: Path, stage: str) -> dict:
    path = done_dir / f"{stage}.json"
    return json.loads(path.read_text())["info"] if path.is_file() else {}


def _seeds(out: Path) -> dict:
    path = out / "eval" / "seeds.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(
    out: Path, split: dict, metrics: dict, commands: list[str], done_dir: Path, prior: dict | None = None
) -> Path:
    """Assemble report.html and report.png from what the stages wrote."""
    samples = out / "samples"
    real_dir, syn_dir, unt_dir = (
        samples / "trained" / "real",
        samples / "trained" / "syn",
        samples / "untrained" / "syn",
    )
    names = sorted(str(p.relative_to(syn_dir)) for p in syn_dir.rglob("*.png"))[:8]  # same names under real/
    rec_dir = samples / "vae_recon"
    pairs = _labelled_grid(
        [
            ("held-out real", [Image.open(real_dir / n) for n in names]),
            ("VAE reconstruction", [Image.open(rec_dir / n) for n in names if (rec_dir / n).is_file()]),
            ("trained", [Image.open(syn_dir / n) for n in names]),
            ("untrained", [Image.open(unt_dir / n) for n in names if (unt_dir / n).is_file()]),
        ],
        tile=192,
    )
    curve = loss_curve(out / "train")
    large_syn = next(iter(sorted((out / "large" / "syn").glob("*.png"))), None)
    large = Image.open(large_syn) if large_syn else None
    quality = _stage_info(done_dir, "quality")
    _figure(pairs, curve, metrics, large, out / "report.png", quality.get("morphology"), _seeds(out))

    records = {
        s: json.loads((done_dir / f"{s}.json").read_text())
        for s in STAGES
        if (done_dir / f"{s}.json").is_file()
    }
    timing_rows = "".join(f"<tr><td>{s}</td><td>{r['seconds']:.0f} s</td></tr>" for s, r in records.items())
    total = sum(r["seconds"] for r in records.values())
    metric_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{m.get('fd_uni2', float('nan')):.3f}</td>"
        f"<td>{m.get('cos_uni2', float('nan')):.3f}</td></tr>"
        for n, m in metrics.items()
    )
    vae_info = records.get("encoders", {}).get("info", {})
    large_html = ""
    if large is not None:
        real_large = Image.open(out / "large_region_real.png")
        large_html = (
            f"<p>{_img_tag(real_large)}</p><p>{_img_tag(large)}</p><p>Top: the real region; bottom: generated by "
            "sliding-window denoising (tools/sample_4k.py), every window conditioned on the stand-in UNI embedding "
            "of the real crop under it (diffusion/sampling/dense_conditions.py), both at full resolution.</p>"
            f"{seams_html(quality.get('seams'))}"
        )
    curve_html = ""
    if curve[0]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(curve[0], curve[1], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        curve_html = _img_tag(Image.open(io.BytesIO(buf.getvalue())))
    first_heldout = real_dir / names[0] if names else None
    vae_html = _img_tag(_vae_example(out, first_heldout)) if first_heldout else ""
    cmds = html.escape("\n".join(commands))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>PixCell CPU demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:left}}
pre{{background:#f4f4f4;padding:8px;white-space:pre-wrap}}</style></head><body>
<h1>PixCell CPU demo on a real H&amp;E region</h1>
<p>Slide: OpenSlide's CMU-1-Small-Region (Aperio, 20x, 0.5 &micro;m/px), tiled into 256 px tissue tiles:
{split.get("train_tiles")} for training, {split.get("heldout_tiles")} held out (the bottom rows of the slide).
The encoders are <b>demo stand-ins</b>, not UNI2-h or the SD3.5 VAE: a small 16-channel f8 VAE trained here on
the training tiles (L1 {vae_info.get("l1_first", float("nan")):.3f} &rarr; {vae_info.get("l1_last", float("nan")):.3f})
and a small ViT of the UNI2-h family trained briefly by contrastive learning on the same tiles. The PixCell model is small too (configs/demo/pixcell_demo_256.py),
trained with the real training script. With the published weights, the same tools make realistic tissue.</p>
<h2>Held-out tiles and their synthetic twins</h2>
<p>Each synthetic tile is generated from the UNI tokens of the real tile on its left (20 DPM-Solver++ steps,
guidance 2.0).</p>{_img_tag(pairs)}
<h2>Metrics (tools/evaluate.py)</h2>
<table><tr><th>model</th><th>Frechet distance (stand-in UNI) &darr;</th><th>paired cosine &uarr;</th></tr>{metric_rows}</table>
{_metric_caveat(metrics)}
{morphology_html(quality.get("morphology"), _seeds(out))}
{_seeds_html(out)}
<p>Inception FID is left out: its weights are not available offline here (pass --inception to tools/evaluate.py).</p>
<h2>Training loss</h2>{curve_html}
<h2>The VAE stand-in</h2>{vae_html}
<h2>Sliding-window region</h2>{large_html}
{_probe_html(out, records.get("augment", {}).get("info", {}))}
{_audit_html(out)}
{_prior_html(out, prior)}
<h2>Timings</h2><table>{timing_rows}<tr><th>total</th><th>{total:.0f} s</th></tr></table>
<h2>Commands run</h2><pre>{cmds}</pre>
</body></html>"""
    report = out / "report.html"
    atomic_write_bytes(report, page.encode())
    return report
