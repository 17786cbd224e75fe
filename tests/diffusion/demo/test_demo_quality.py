"""The demo's encoder-free verdicts (diffusion/demo/quality.py, report_quality.py) on folders of real tiles."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from diffusion.demo.quality import morphology_verdicts, seam_report
from diffusion.demo.report_quality import morphology_html, seams_html


def test_verdicts_rank_sets_and_render(slide_tiles, tmp_path):
    real, same, blurred = tmp_path / "real", tmp_path / "same", tmp_path / "blur"
    for folder in (real, same, blurred):
        folder.mkdir()
    tiles = [t for _, t in slide_tiles[:12]]
    for i, t in enumerate(tiles):
        Image.fromarray(t).save(real / f"{i}.png")
        Image.fromarray(tiles[(i + 6) % 12]).save(same / f"{i}.png")
        Image.fromarray(t).filter(ImageFilter.GaussianBlur(3)).save(blurred / f"{i}.png")
    sets = {"other real": [same], "blurred": [blurred], "empty": []}
    v = morphology_verdicts(real, sets, [("blurred", "other real"), ("blurred", "empty")], n_boot=30)
    assert set(v["sets"]) == {"other real", "blurred"}  # a set without images is left out, not an error
    assert v["sets"]["other real"]["fd"]["value"] < v["sets"]["blurred"]["fd"]["value"]
    d = v["differences"]["blurred - other real"]
    assert d["low"] > 0 and list(v["differences"]) == ["blurred - other real"]
    page = morphology_html(v, {"trained": {"fd_pooled": {"value": 1.0, "low": 0.5, "high": 2.0}}})
    assert "other real (12)" in page and "other real closer" in page and "nuclei density" in page

    big = np.concatenate([np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:6], axis=1)], axis=0)
    Image.fromarray(big).save(tmp_path / "tiled.png")  # real tiles side by side: seams where they meet
    Image.fromarray(big).filter(ImageFilter.GaussianBlur(1)).save(tmp_path / "smooth.png")
    seams = seam_report(tmp_path / "smooth.png", tmp_path / "tiled.png", 256, 64)
    assert seams["window"]["generated"]["columns"] > seams["stride"]["generated"]["columns"]
    assert "256 px window grid" in seams_html(seams) and "64 px stride grid" in seams_html(seams)
