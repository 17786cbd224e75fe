"""tools/evaluate.py with no encoder weights: the morphology distance is the default metric and is reported."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageFilter

from tools.evaluate import main


def test_default_metric_without_weights_is_morphology(slide_tiles, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PIXCELL_INCEPTION", raising=False)
    real, same, blurred = tmp_path / "real", tmp_path / "same", tmp_path / "blurred"
    for folder in (real, same, blurred):
        folder.mkdir()
    for i, (_, tile) in enumerate(slide_tiles[:12]):
        image = Image.fromarray(tile)
        image.save(real / f"{i:02d}.png")
        image.save(same / f"{i:02d}.png")
        image.filter(ImageFilter.GaussianBlur(2)).save(blurred / f"{i:02d}.png")
    common = ["--no-progress", "--num-workers", "0", "--device", "cpu"]
    assert main([str(real), str(same), "--out", str(tmp_path / "a"), *common]) == 0
    assert main([str(real), str(blurred), "--out", str(tmp_path / "b"), *common]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert list(a["metrics"]) == ["morphology"] and a["encoders"] == {}
    assert a["metrics"]["morphology"] == 0.0 < b["metrics"]["morphology"]
    fd = b["morphology"]["frechet"]
    assert fd["low"] <= fd["high"] and np.isfinite(fd["value"])
    edges = next(r for r in b["morphology"]["features"] if r["name"] == "edge_density")
    assert edges["syn_median"] < 0.7 * edges["real_median"]  # blur removes edges
    report = (tmp_path / "b" / "report.md").read_text()
    assert "| morphology |" in report and "nuclei_density" in report and "## Encoders" not in report
    assert "morphology" in capsys.readouterr().out
