"""tools.augment on a tiny random PixCell and the real slide's tiles: classes, counts and names kept, the
manifest, byte-identical resume, class balancing, size policies and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.command import run_cli
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.augment import ClassFolderSource, variant_counts, variant_source
from diffusion.sampling.conditions import name_seed
from tools.augment import main

C = 96  # the tiny UNI stand-in's embedding size


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny random PixCell making 64 px images from one token (a non-zero head: conditions matter)."""
    out = tmp_path_factory.mktemp("aug_model") / "t64"
    torch.manual_seed(0)
    m = build_pixcell("PixCell-tiny-64", caption_channels=C).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    m.save_pretrained(out)
    return out


def _save(path: Path, image: np.ndarray, size: int | None = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(image)
    (im.resize((size, size), Image.BILINEAR) if size else im).save(path)


@pytest.fixture()
def data(tmp_path, slide_tiles) -> Path:
    """DATA/<class>/...: 3 'cellular' tiles (one a level deeper) and 1 'stromal' tile, 64 px."""
    root = tmp_path / "data"
    arrays = [a for _, a in slide_tiles[:4]]
    _save(root / "cellular" / "a.png", arrays[0])
    _save(root / "cellular" / "b.png", arrays[1])
    _save(root / "cellular" / "slide2" / "c.png", arrays[2])
    _save(root / "stromal" / "d.png", arrays[3])
    return root


def _args(model: Path, vae: Path, uni: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [str(data), "--model", str(model), "--vae", str(vae), "--uni", str(uni), "--out", str(out),
            "--steps", "2", "--device", "cpu", "--no-progress", "--batch", "3", *extra]  # fmt: skip


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_variants_keep_class_count_and_name_and_resume_byte_identical(
    model, tiny_vae_dir, tiny_uni_dir, data, tmp_path
):
    out = tmp_path / "out"
    argv = _args(model, tiny_vae_dir, tiny_uni_dir, data, out, "--per-image", "2")
    assert run_cli(main, argv) == 0
    first = _tree(out)
    expected = {f"{stem}_{k}.png" for stem in ("cellular/a", "cellular/b", "cellular/slide2/c", "stromal/d")
                for k in (0, 1)}  # fmt: skip
    assert set(first) == expected
    for name in first:
        assert Image.open(out / name).size == (64, 64)
    # Variants of one image differ: their seeds do.
    assert first["cellular/a_0.png"] != first["cellular/a_1.png"]

    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for r in rows:
        cls = r["syn"].split("/")[0]
        assert r["source"]["class"] == cls
        src = Path(r["source"]["file"])
        assert src.is_relative_to(data / cls) and r["syn"].startswith(
            src.relative_to(data).with_suffix("").as_posix()
        )
        assert r["seed"] == name_seed(0, r["name"]) and r["steps"] == 2 and r["model"].startswith("sha256:")
        assert r["sampler"] == "dpm-solver" and r["guidance"] == 2.0 and r["real"] is None

    # Resume: a lost image and a leftover temporary from a killed run; the rerun restores the same bytes.
    (out / "stromal" / "d_1.png").unlink()
    (out / "cellular" / ".a_0.png.tmp").write_bytes(b"partial")
    assert run_cli(main, argv) == 0
    assert _tree(out) == first
    assert not list(out.rglob("*.tmp"))
    # Other settings into the same folder are refused (run.json).
    assert run_cli(main, [*argv, "--guidance", "3"]) == 2


def test_per_class_total_balances_classes(model, tiny_vae_dir, tiny_uni_dir, data, tmp_path):
    out = tmp_path / "bal"
    assert run_cli(main, _args(model, tiny_vae_dir, tiny_uni_dir, data, out, "--per-class-total", "4")) == 0
    made = _tree(out)
    per_class = {c: sum(n.startswith(c + "/") for n in made) for c in ("cellular", "stromal")}
    assert per_class == {"cellular": 4, "stromal": 4}  # 3 images -> 2+1+1; 1 image -> 4
    assert {n for n in made if n.startswith("stromal/")} == {f"stromal/d_{k}.png" for k in range(4)}
    assert variant_counts(3, None, 4) == [2, 1, 1] and variant_counts(2, 3, None) == [3, 3]
    assert variant_source("cellular/slide2/c_3", {"cellular/slide2/c"}) == "cellular/slide2/c"
    assert variant_source("cellular/x_3", {"cellular/slide2/c"}) is None


def test_size_policies(tmp_path, slide_tiles):
    root = tmp_path / "big"
    _save(root / "x" / "a.png", slide_tiles[0][1], size=None)  # 256 px for a 64 px model
    with pytest.raises(
        ValueError, match="256x256 px, the model makes 64 px images; choose `resize` or `crop`"
    ):
        ClassFolderSource(1, 64, root, per_image=1)
    for fit in ("resize", "crop"):
        src = ClassFolderSource(1, 64, root, per_image=1, fit=fit)
        image = src.load(src.specs()[0]).image
        assert image.shape == (64, 64, 3)
    crop = ClassFolderSource(1, 64, root, per_image=1, fit="crop")
    assert np.array_equal(crop.load(crop.specs()[0]).image, slide_tiles[0][1][96:160, 96:160])


def test_one_line_errors(model, tiny_vae_dir, tiny_uni_dir, data, tmp_path, capsys):
    def error(path: Path, *extra: str) -> str:
        capsys.readouterr()
        assert run_cli(main, _args(model, tiny_vae_dir, tiny_uni_dir, path, tmp_path / "o", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ")
        return err

    (data / "empty").mkdir()
    assert "class folder 'empty' holds no images" in error(data, "--per-image", "1")
    (data / "empty").rmdir()
    _save(data / "stromal" / "e.png", np.zeros((40, 40, 3), np.uint8), size=None)
    assert "mismatched image sizes" in error(data, "--per-image", "1")
    (data / "stromal" / "e.png").unlink()
    _save(data / "stray.png", np.zeros((64, 64, 3), np.uint8))
    assert "images directly inside" in error(data, "--per-image", "1")
    (data / "stray.png").unlink()
    assert "--per-image 0: expected >= 1" in error(data, "--per-image", "0")
    assert "no such file or folder" in error(tmp_path / "missing", "--per-image", "1")


def test_sde_sampler_variants_repeat_under_the_seed(model, tiny_vae_dir, tiny_uni_dir, data, tmp_path):
    """augment offers every sampler of the sampling tools; an SDE one draws its per-step noise from the
    per-image generator, so a second run in another folder gives the same bytes."""
    trees = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = _args(
            model, tiny_vae_dir, tiny_uni_dir, data, out, "--per-image", "1", "--sampler", "sde-dpm-solver"
        )
        assert run_cli(main, argv) == 0
        rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(r["sampler"] == "sde-dpm-solver" for r in rows)
        trees.append(_tree(out))
    assert trees[0] == trees[1]
    ode = tmp_path / "ode"
    assert run_cli(main, _args(model, tiny_vae_dir, tiny_uni_dir, data, ode, "--per-image", "1")) == 0
    assert _tree(ode) != trees[0]  # the SDE sampler was used, not the default DPM-Solver++
