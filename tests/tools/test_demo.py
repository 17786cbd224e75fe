"""`make demo` end to end on the real slide region, reduced (few steps), and its reuse on a rerun."""

from __future__ import annotations

import json
import re
import time

from PIL import Image

from tools.demo import main as demo

REDUCED = ["--train-steps", "30", "--vae-steps", "20", "--sample-steps", "4", "--large-size", "512", "--seeds", "2",
           "--prior-seeds", "2", "--aug-per-image", "1", "--train-crops", "32"]  # fmt: skip


def test_reduced_demo_writes_a_complete_report_and_reuses_its_stages(tmp_path, real_slide, capsys):
    out = tmp_path / "demo"
    assert demo(["--out", str(out), *REDUCED]) == 0

    page = (out / "report.html").read_text()
    for section in ("Held-out tiles and their synthetic twins", "Metrics", "Training loss", "Sliding-window region",
                    "Timings", "Commands run", "demo stand-ins", "Over 2 seeds per held-out condition",
                    "Augmentation and a linear probe", "Memorisation audit",
                    "Generation without a reference image", "Morphology, no encoder", "Seams:"):  # fmt: skip
        assert section in page, section
    images = re.findall(r'src="data:image/png;base64,', page)
    assert (
        len(images) >= 5
    )  # pairs, loss curve, VAE example, real and generated region: inlined, self-contained
    assert '<img src="http' not in page and "file://" not in page
    for tool in ("tools.extract_patches", "tools.build_index", "tools.extract_features",
                 "train_scripts.train_pixcell", "tools.sample ", "tools.evaluate", "tools.sample_4k", "tools.augment",
                 "tools.probe", "tools.audit", "train_scripts.train_prior", "tools.evaluate_prior"):  # fmt: skip
        assert tool in page, tool

    figure = Image.open(out / "report.png")
    assert figure.format == "PNG" and figure.size[0] > 800

    metrics = json.loads((out / ".done" / "evaluate.json").read_text())["info"]
    assert set(metrics) == {"trained", "untrained"}
    for m in metrics.values():
        assert m["fd_uni2"] >= 0 and -1 <= m["cos_uni2"] <= 1
    # Every held-out tile has a synthetic twin of its size, under the same relative name.
    real = sorted(
        p.relative_to(out / "samples/trained/real") for p in (out / "samples/trained/real").rglob("*.png")
    )
    syn = sorted(
        p.relative_to(out / "samples/trained/syn") for p in (out / "samples/trained/syn").rglob("*.png")
    )
    assert real and real == syn
    assert Image.open(out / "samples/trained/syn" / syn[0]).size == (256, 256)
    # Several seeds per condition, their distances with CIs; augment + probe + audit on the labelled tiles.
    seeds = json.loads((out / "eval" / "seeds.json").read_text())
    for d in seeds.values():
        assert len(d["fd_per_seed"]) == 2 and d["n_syn"] == 2 * d["n_real"]
        assert d["fd_pooled"]["low"] <= d["fd_pooled"]["high"]
    labels = json.loads((out / ".done" / "augment.json").read_text())["info"]["counts"]
    n_train = sum(v for k, v in labels.items() if k.startswith("train/"))
    assert abs(labels["train/cellular"] - labels["train/stromal"]) <= 1  # the median rule balances training
    made = sorted(p.relative_to(out / "augmented") for p in (out / "augmented").rglob("*.png"))
    assert len(made) == n_train and all(p.parts[0] in ("cellular", "stromal") for p in made)
    probe = json.loads((out / ".done" / "probe.json").read_text())["info"]
    assert {r["train"] for r in probe["results"]} == {"real", "real+syn:augmented", "syn:augmented"}
    audit = json.loads((out / ".done" / "audit.json").read_text())["info"]
    assert audit["n_synthetic"] == n_train and audit["reference_flagged"] == 0
    # Images from the UNI prior beside conditional and null-condition ones, as many of each, with bootstrap FDs.
    prior = json.loads((out / ".done" / "prior.json").read_text())["info"]
    fd = prior["fd_images"]
    assert set(fd["sets"]) == {"conditional", "prior", "null"} and fd["n_reference"] == len(real)
    for m in fd["sets"].values():
        assert m["n_images"] == 2 * len(real) and 0 < m["value"] and m["low"] <= m["high"]
    for name, d in fd["differences"].items():  # "a - b": FD(a) - FD(b), with its shared-reference interval
        a, b = name.split(" - ")
        assert (
            abs(d["value"] - (fd["sets"][a]["value"] - fd["sets"][b]["value"])) < 1e-9
            and d["low"] <= d["high"]
        )
    grid = Image.open(out / "samples_prior" / "grid.png")  # held-out real | conditional | prior | null
    assert grid.width == 4 * 128 and grid.height > 128
    # Encoder-free verdicts: every set's morphology distance with its interval, and the region's seams.
    quality = json.loads((out / ".done" / "quality.json").read_text())["info"]
    sets = quality["morphology"]["sets"]
    assert {"VAE reconstruction", "trained", "untrained", "conditional", "null", "prior"} <= set(sets)
    assert all(s["fd"]["low"] <= s["fd"]["high"] for s in sets.values())
    assert "null - conditional" in quality["morphology"]["differences"]
    seams = quality["seams"]
    assert seams["window"]["period_px"] == 256 and seams["stride"]["period_px"] == 64
    assert seams["window"]["generated"]["columns"] > 0 and seams["stride"]["real"]["rows"] > 0
    assert quality["morphology"]["real"]["n"] == len(real)
    large = next((out / "large" / "syn").rglob("*.png"))
    assert Image.open(large).size == (512, 512)

    capsys.readouterr()
    start = time.perf_counter()
    assert demo(["--out", str(out), *REDUCED]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("reused") == 14  # every stage (quality included), none recomputed
    assert time.perf_counter() - start < 60
