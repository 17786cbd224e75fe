"""tools/evaluate.py end to end, offline, with tiny random encoders loaded through the real loaders."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion.metrics.evaluation import evaluate, resolve_plan
from diffusion.standins import build_tiny_inception, build_tiny_timm_encoder
from tools.evaluate import encoder_specs, main

N = 8


def tissue(rng: np.random.Generator, size: int = 64, nuclei: int = 12, pale: bool = False) -> np.ndarray:
    """An H&E-like toy tile: pink stroma with purple nuclei (pale: washed-out, few nuclei)."""
    base = np.array([235, 200, 220] if pale else [225, 150, 190], float)
    img = base + rng.normal(0, 8, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    for _ in range(nuclei // (4 if pale else 1)):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 7)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = [90, 50, 140] if not pale else [180, 150, 200]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_uni_dir):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for name in ("real", "same", "jpeg", "pale"):
        (root / name).mkdir()
    for i in range(N):
        real = tissue(rng)
        Image.fromarray(real).save(root / "real" / f"{i:02d}.png")
        Image.fromarray(real).save(root / "same" / f"{i:02d}.png")
        buf = io.BytesIO()
        Image.fromarray(real).save(buf, format="JPEG", quality=30)  # the same tiles, JPEG-degraded
        Image.open(buf).save(root / "jpeg" / f"{i:02d}.png")
        Image.fromarray(tissue(rng, pale=True)).save(root / "pale" / f"{i:02d}.png")
    return {
        "root": root,
        "inception": build_tiny_inception(root / "inception"),
        "encoders": [f"uni2={tiny_uni_dir}", f"vit={build_tiny_timm_encoder(root / 'vit')},pool=cls+mean"],
        "metrics": ["fid", "kid", "fd_uni2", "cos_uni2", "fd_vit", "kid_vit", "cos_vit"],
    }


def _run(setup, syn, **kw):
    kw.setdefault("metrics", setup["metrics"])
    kw.setdefault("cache_dir", setup["root"] / "cache")
    return evaluate(
        setup["root"] / "real",
        setup["root"] / syn,
        encoders=setup["encoders"],
        inception=setup["inception"],
        device="cpu",
        kid_subsets=20,
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """One evaluation per SYN folder, shared by the tests that only read results (keeps the file fast)."""
    out = tmp_path_factory.mktemp("reports")
    return {
        syn: _run(setup, syn, cache="none", out=out / syn) | {"out": out / syn}
        for syn in ("same", "jpeg", "pale")
    }


def test_identical_folders_score_zero(runs):
    m = runs["same"]["metrics"]
    for name in ("fid", "fd_uni2", "fd_vit"):
        assert m[name] == pytest.approx(0.0, abs=1e-6), name
    for name in ("cos_uni2", "cos_vit"):
        assert m[name] == pytest.approx(1.0, abs=1e-6), name
    different = runs["pale"]["metrics"]
    assert abs(m["kid"]) < abs(different["kid"]) / 10 and abs(m["kid_vit"]) < abs(different["kid_vit"]) / 10


def test_metrics_rank_degradations(runs):
    jpeg, pale = runs["jpeg"]["metrics"], runs["pale"]["metrics"]
    for name in ("fid", "fd_uni2", "fd_vit"):
        assert 0 < jpeg[name] < pale[name], name
    for name in ("cos_uni2", "cos_vit"):
        assert pale[name] < jpeg[name] < 1.0, name


def test_report_files(setup, runs):
    report, folder = runs["jpeg"], runs["jpeg"]["out"]
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(report["metrics"])
    assert list(saved["metrics"]) == setup["metrics"]
    assert saved["real"]["num_images"] == N and saved["encoders"]["vit"]["dim"] == 64
    assert saved["cosine"]["uni2"]["mean"] == pytest.approx(report["metrics"]["cos_uni2"])
    md = (folder / "report.md").read_text()
    for name, value in report["metrics"].items():  # one table row per metric, with its value
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert float(row.split("|")[2]) == pytest.approx(value, rel=1e-3, abs=1e-6)
    assert "## Conditional fidelity" in md and "| vit |" in md
    with Image.open(folder / "report.png") as png:
        assert png.format == "PNG" and png.size[0] > 600
    rows = list(csv.reader((folder / "pairs.csv").open()))
    assert rows[0] == ["name", "cos_uni2", "cos_vit"] and len(rows) == N + 1
    assert np.mean([float(r[1]) for r in rows[1:]]) == pytest.approx(report["metrics"]["cos_uni2"], abs=1e-5)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cache_reuses_and_invalidates(setup, tmp_path):
    root = setup["root"]
    real = tmp_path / "real"
    shutil.copytree(root / "real", real)
    cache = tmp_path / "cache"

    def run(**kw):
        return evaluate(
            real,
            root / "jpeg",
            metrics=["fid", "fd_vit", "cos_vit"],
            encoders=setup["encoders"],
            inception=setup["inception"],
            device="cpu",
            cache_dir=cache,
            progress=False,
            **kw,
        )

    first = run()
    assert first["settings"]["cache_hits"]["vit"] == {"REAL": False, "SYN": False}
    assert len(list(cache.glob("*.npz"))) == 2  # REAL only (inception, vit): the default caches the reference
    second = run()
    assert second["settings"]["cache_hits"]["vit"] == {"REAL": True, "SYN": False}
    assert second["settings"]["cache_hits"]["inception"]["REAL"] is True
    assert second["metrics"] == first["metrics"]  # bit-identical
    Image.fromarray(tissue(np.random.default_rng(7), pale=True)).save(real / "03.png")  # edit one image
    third = run()
    assert third["settings"]["cache_hits"]["vit"]["REAL"] is False
    assert third["metrics"]["fd_vit"] != first["metrics"]["fd_vit"]
    assert len(list(cache.glob("*.npz"))) == 4
    run(cache="all")
    assert run(cache="all")["settings"]["cache_hits"]["vit"] == {"REAL": True, "SYN": True}


def test_plan_defaults_and_cli_encoder_merge():
    names, needed = resolve_plan(None, None)
    assert names == ["fid", "kid", "fd_uni2", "cos_uni2"] and set(needed) == {"inception", "uni2"}
    assert encoder_specs(None, ["mine=/x,pool=cls"]) == ["uni2", "mine=/x,pool=cls"]
    assert encoder_specs("hoptimus0", ["uni2=/u"]) == ["hoptimus0"]
    names, needed = resolve_plan(["fd_inception", "cos_virchow2"], [])
    assert names == ["fid", "cos_virchow2"] and needed["virchow2"].pool == "cls+mean"


def _cli(setup, capsys, syn, *extra, real=None):
    argv = [
        str(real or setup["root"] / "real"),
        str(syn),
        "--out",
        str(setup["root"] / "cli_out"),
        "--inception",
        str(setup["inception"]),
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-progress",
        "--cache",
        "none",
        *extra,
    ]
    for enc in setup["encoders"]:
        argv += ["--encoder", enc]
    rc = main(argv)
    return rc, capsys.readouterr()


def test_cli_bad_input_gives_one_line_errors(setup, capsys, tmp_path, monkeypatch):
    root = setup["root"]
    (tmp_path / "empty").mkdir()
    rc, out = _cli(setup, capsys, tmp_path / "empty")
    assert (
        rc == 2
        and out.err.strip()
        == f"error: SYN {tmp_path / 'empty'}: no images (.png, .jpg, .jpeg, .tif, .tiff) found"
    )

    unpaired = tmp_path / "unpaired"
    shutil.copytree(root / "pale", unpaired)
    (unpaired / "04.png").rename(unpaired / "x04.png")
    rc, out = _cli(setup, capsys, unpaired, "--metrics", "fd_vit,cos_vit")
    assert (
        rc == 2
        and "cos_vit pairs images by file name" in out.err
        and "e.g. 04" in out.err
        and "e.g. x04" in out.err
    )
    rc, out = _cli(setup, capsys, unpaired, "--metrics", "fd_vit")  # FD needs no pairs
    assert rc == 0 and "fd_vit" in out.out

    broken = tmp_path / "broken"
    shutil.copytree(root / "pale", broken)
    (broken / "05.png").write_bytes((broken / "05.png").read_bytes()[:100])
    rc, out = _cli(setup, capsys, broken, "--metrics", "fd_vit")
    assert rc == 2 and f"{broken / '05.png'}: cannot read image" in out.err

    rc, out = _cli(setup, capsys, root / "pale", "--metrics", "fid,fd_nope")
    assert rc == 2 and "no encoder 'nope'" in out.err
    rc, out = _cli(setup, capsys, root / "pale", "--metrics", "psnr")
    assert rc == 2 and "'psnr' is not fid, kid" in out.err

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("diffusion.metrics.inception.CLEANFID_DIR", tmp_path / "cleanfid")
    argv = [
        str(root / "real"),
        str(root / "pale"),
        "--out",
        str(tmp_path / "o"),
        "--metrics",
        "fid",
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Inception weights for FID/KID not found") and err.count("\n") == 1
    assert "Traceback" not in err


def test_cli_subprocess_exit_code(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.evaluate",
            str(tmp_path / "nope"),
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: REAL {tmp_path / 'nope'}: no such folder"


@pytest.mark.slow
def test_fid_equals_clean_fid_compute_fid(setup):
    """The whole FID against clean-fid's own compute_fid (its 2048x2048 sqrtm takes ~15 s on 2 CPU cores)."""
    import torch
    from cleanfid.fid import compute_fid

    from diffusion.metrics.inception import load_inception

    root = setup["root"]
    ours = _run(setup, "jpeg", metrics=["fid"], cache="none")["metrics"]["fid"]
    model = load_inception(setup["inception"]).model
    theirs = compute_fid(
        str(root / "real"),
        str(root / "jpeg"),
        mode="clean",
        custom_feat_extractor=model,
        device=torch.device("cpu"),
        num_workers=0,
        verbose=False,
    )
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_single_metric_reports(setup, tmp_path):
    """KID alone draws KID bars; cos alone needs only one pair (FD would need two images)."""
    vit = [setup["encoders"][1]]
    kid = evaluate(
        setup["root"] / "real",
        setup["root"] / "pale",
        out=tmp_path / "kid",
        metrics=["kid_vit"],
        encoders=vit,
        device="cpu",
        cache="none",
        kid_subsets=5,
        progress=False,
    )
    assert list(kid["metrics"]) == ["kid_vit"] and (tmp_path / "kid" / "report.png").stat().st_size > 1000
    assert not (tmp_path / "kid" / "pairs.csv").exists()
    for sub in ("r", "s"):
        (tmp_path / sub).mkdir()
        shutil.copy(setup["root"] / "real" / "00.png", tmp_path / sub / "only.png")
    cos = evaluate(
        tmp_path / "r",
        tmp_path / "s",
        out=tmp_path / "cos",
        metrics=["cos_vit"],
        encoders=vit,
        device="cpu",
        cache="none",
        progress=False,
    )
    assert cos["metrics"]["cos_vit"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 images, found 1"):
        evaluate(
            tmp_path / "r", tmp_path / "s", metrics=["fd_vit"], encoders=vit, device="cpu", progress=False
        )


def test_cache_is_shared_across_encoder_names(setup, tmp_path):
    vit_dir = setup["encoders"][1].split("=", 1)[1].split(",")[0]
    kw = dict(metrics=None, device="cpu", cache_dir=tmp_path / "cache", progress=False)
    kw["metrics"] = ["fd_a"]
    first = evaluate(setup["root"] / "real", setup["root"] / "pale", encoders=[f"a={vit_dir},pool=cls"], **kw)
    kw["metrics"] = ["fd_b"]
    second = evaluate(
        setup["root"] / "real", setup["root"] / "pale", encoders=[f"b={vit_dir},pool=cls"], **kw
    )
    assert second["settings"]["cache_hits"]["b"]["REAL"] is True
    assert second["metrics"]["fd_b"] == first["metrics"]["fd_a"]
