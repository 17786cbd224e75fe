"""The memorisation audit on the real slide's tiles: planted copies of every kind are flagged, held-out tiles of
the same slide are not; exact and faiss search agree; --fail-on-copies exit codes; a dataset index as TRAIN
with the slide-level rates; one-line errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from diffusion.audit.pixels import match
from diffusion.audit.search import FeatureIndex
from diffusion.command import run_cli
from diffusion.data.slides import open_slide, read_rgb
from tools.audit import main


def _jpeg(a: np.ndarray, quality: int = 70) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _recolour(a: np.ndarray) -> np.ndarray:
    """A slight stain shift: per-channel gain and offset."""
    return np.clip(a * np.array([1.06, 0.94, 1.03]) + np.array([-8, 5, 3]), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, slide_tiles, real_slide) -> Path:
    """train/ (even tiles), heldout/ (odd tiles: same slide, never copied), copies/ (one planted copy of a
    training tile per kind), as PNG files."""
    root = tmp_path_factory.mktemp("audit")
    slide, _ = open_slide(real_slide)
    train, held = slide_tiles[::2], slide_tiles[1::2]
    for name, tiles in (("train", train), ("heldout", held)):
        for (r, c), a in tiles:
            (root / name).mkdir(exist_ok=True)
            Image.fromarray(a).save(root / name / f"{r}_{c}.png")

    def shifted(k: int, dy: int, dx: int) -> np.ndarray:
        (r, c), _ = train[k]
        return np.asarray(read_rgb(slide, c * 256 + dx, r * 256 + dy, 0, 256))

    t = [a for _, a in train]
    copies = {
        "exact": t[0],
        "mirrored": t[1][:, ::-1],
        "rot90": np.rot90(t[2], 1),
        "rot180": np.rot90(t[3], 2),
        "rot270_mirrored": np.rot90(t[4], 3)[::-1],
        "jpeg": _jpeg(t[5], 70),
        "shift16": shifted(6, 16, -16),
        "shift11": shifted(7, -11, 5),
        "recoloured": _recolour(t[8]),
        "everything": _jpeg(_recolour(np.rot90(shifted(9, 9, -13), 1)), 80),
    }
    (root / "copies").mkdir()
    for name, a in copies.items():
        Image.fromarray(np.ascontiguousarray(a)).save(root / "copies" / f"{name}.png")
    return root


def _argv(root: Path, syn: str, encoder: Path, out: Path, *extra: str) -> list[str]:
    return ["--train", str(root / "train"), "--synthetic", str(root / syn), "--reference", str(root / "heldout"),
            "--out", str(out), "--encoder", f"uni2={encoder}", "--num-workers", "0", "--no-cache",
            "--no-progress", "--k", "3", *extra]  # fmt: skip


def test_planted_copies_of_every_kind_are_flagged(sets, tiny_uni_dir, tmp_path):
    out = tmp_path / "a"
    assert run_cli(main, _argv(sets, "copies", tiny_uni_dir, out)) == 0
    result = json.loads((out / "audit.json").read_text())
    rows = {r["name"]: r for r in result["per_image"]}
    assert len(rows) == 10
    for name, r in rows.items():
        assert r["flagged"], (name, r)
        assert r["reason"].startswith("pixel copy of")
        assert r["scores"]["pixel_ncc"] > 0.95
    # The matched training image is the one each copy was made from (train tiles are row-major, k-th kind).
    train_keys = sorted(
        (p.stem for p in (sets / "train").glob("*.png")), key=lambda s: tuple(map(int, s.split("_")))
    )
    for k, name in enumerate(("exact", "mirrored", "rot90", "rot180", "rot270_mirrored", "jpeg", "shift16", "shift11",
                              "recoloured", "everything")):  # fmt: skip
        assert rows[name]["nearest_train"] == train_keys[k], name
    assert rows["mirrored"]["scores"]["transform"] == "flip"
    assert rows["shift16"]["scores"]["shift"] in ([16, -16], [-16, 16])
    s = result["summary"]
    assert s["flagged"] == 10 and s["reference_flagged"] == 0 and not s["warnings"]
    # The held-out tiles of the same slide stay far below the threshold: the yardstick.
    assert s["pixel_ncc"]["reference"]["max"] < 0.6
    assert "flagged as copies: 10" in (out / "report.md").read_text()
    assert Image.open(out / "report.png").format == "PNG"
    # A release checklist: --fail-on-copies exits 1 when anything is flagged ...
    assert run_cli(main, _argv(sets, "copies", tiny_uni_dir, tmp_path / "b", "--fail-on-copies")) == 1


def test_held_out_tiles_of_the_same_slide_are_not_flagged(sets, tiny_uni_dir, tmp_path):
    # ... and 0 on new tissue: the held-out tiles audited as if they were synthetic.
    out = tmp_path / "h"
    assert run_cli(main, _argv(sets, "heldout", tiny_uni_dir, out, "--fail-on-copies")) == 0
    result = json.loads((out / "audit.json").read_text())
    assert result["summary"]["flagged"] == 0
    assert all(not r["flagged"] and r["scores"]["pixel_ncc"] < 0.6 for r in result["per_image"])


def test_pixel_match_is_invariant_and_discriminates(slide_tiles):
    a, b = slide_tiles[0][1], slide_tiles[1][1]
    for copy in (a, np.rot90(a, 1), a[::-1], _recolour(a), _jpeg(a, 50)):
        (m,) = match(np.ascontiguousarray(copy), [a])
        assert m.score > 0.95
    (m,) = match(b, [a])
    assert m.score < 0.6
    shifted = np.roll(a, (9, -14), axis=(0, 1))  # wrapped borders lie outside the compared centre
    (m,) = match(shifted, [a])
    assert m.score > 0.99 and m.shift == (-9, 14)


def test_exact_chunked_and_faiss_search_agree():
    rng = np.random.default_rng(0)
    base, queries = (
        rng.normal(size=(3000, 24)).astype(np.float32),
        rng.normal(size=(50, 24)).astype(np.float32),
    )
    exact_s, exact_i = FeatureIndex(base, "exact", chunk=700).search(queries, 5)
    ref = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        base / np.linalg.norm(base, axis=1, keepdims=True)
    ).T
    assert np.array_equal(exact_i, np.argsort(-ref, axis=1)[:, :5])
    assert np.allclose(exact_s, np.sort(ref, axis=1)[:, ::-1][:, :5], atol=1e-5)
    flat_s, flat_i = FeatureIndex(base, "flat").search(queries, 5)
    assert np.array_equal(flat_i[:, 0], exact_i[:, 0]) and np.allclose(flat_s, exact_s, atol=1e-4)
    ivf = FeatureIndex(base, "ivf", nprobe=54)  # every list probed: 8-bit codes only
    assert (ivf.search(queries, 5)[1][:, 0] == exact_i[:, 0]).mean() >= 0.9
    with pytest.raises(ValueError, match="queries: expected"):
        FeatureIndex(base, "exact").search(queries[:, :3], 1)


def test_index_as_train_gives_slide_level_rates(sets, tiny_uni_dir, tmp_path):
    """TRAIN and the held-out set as a dataset index over two slides; synthetic images with a sampling manifest."""
    root = tmp_path / "patches"
    names: dict[str, list[str]] = {"ds_train_256": [], "ds_held_256": []}
    for folder, key in (("train", "ds_train_256"), ("heldout", "ds_held_256")):
        for i, png in enumerate(sorted((sets / folder).glob("*.png"))):
            rel = f"ds/cancer/single_256/slide{'AB'[i % 2]}/{png.stem}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(png.read_bytes())
            names[key].append(rel)
    (root / "metadata").mkdir()
    with h5py.File(root / "metadata" / "patch_names_all.hdf5", "w") as h5:
        for key, rels in names.items():
            h5.create_dataset(key, data=np.array(rels, dtype=object), dtype=h5py.string_dtype())
    syn = tmp_path / "run" / "syn"
    syn.mkdir(parents=True)
    rows = []
    for rel in names["ds_train_256"][:4]:  # "synthetic" = copies of training patches, conditioned on them
        (syn / Path(rel).name).write_bytes((root / rel).read_bytes())
        rows.append({"syn": f"syn/{Path(rel).name}", "source": {"type": "index", "patch": rel}})
    (tmp_path / "run" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = str(root / "metadata" / "patch_names_all.hdf5")
    out = tmp_path / "idx"
    argv = ["--train", index, "--train-keys", "ds_train_256", "--synthetic", str(syn), "--reference", index,
            "--reference-keys", "ds_held_256", "--out", str(out), "--encoder", f"uni2={tiny_uni_dir}",
            "--num-workers", "0", "--no-cache", "--no-progress"]  # fmt: skip
    assert run_cli(main, argv) == 0
    s = json.loads((out / "audit.json").read_text())["summary"]
    assert s["flagged"] == 4 and s["n_train"] == len(names["ds_train_256"])
    sl = s["slide_level"]
    assert sl["n_train_slides"] == 2 and sl["synthetic"] == {"same_slide": 4, "known": 4, "rate": 1.0}
    assert sl["reference"]["known"] == len(names["ds_held_256"]) and 0 <= sl["reference"]["rate"] <= 1
    assert "Slide level" in (out / "report.md").read_text()


def test_one_line_errors(sets, tiny_uni_dir, tmp_path, capsys):
    def error(*argv: str) -> str:
        capsys.readouterr()
        assert run_cli(main, list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    base = ["--out", str(tmp_path / "o"), "--encoder", f"uni2={tiny_uni_dir}", "--no-cache", "--no-progress"]
    assert "no such folder" in error(
        "--train", str(sets / "train"), "--synthetic", str(tmp_path / "nope"), *base
    )
    assert "no such index file" in error(
        "--train", str(tmp_path / "x.hdf5"), "--synthetic", str(sets / "copies"), *base
    )
    assert "is a folder, not a dataset index" in error(
        "--train", str(sets / "train"), "--train-keys", "k", "--synthetic", str(sets / "copies"), *base
    )
