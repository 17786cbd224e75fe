"""virtual_staining data: MIST and HER2Match folder layouts, pairing by file name, bad files, embedding cache."""

from __future__ import annotations

import logging

import pytest
import torch

from diffusion.data.ihc_pairs import PairedImages, dataset_pairs, read_image
from diffusion.data.ihc_tokens import compute_embeddings, ensure_embeddings, load_embeddings
from tests.helpers.vs_data import make_her2match, make_mist, write_image

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models


def test_both_layouts_pair_by_file_name(tmp_path):
    mist = make_mist(tmp_path / "MIST", stain="Ki67", split="val")
    pairs = dataset_pairs("MIST", mist, "val", stain="Ki67")
    assert [p.name for p in pairs] == ["000.png", "001.png", "002.png"]
    assert pairs[1].he.parent.name == "valA" and pairs[1].ihc.parent.name == "valB"
    h2m = make_her2match(tmp_path / "H2M", split="test", n=2)
    pairs = dataset_pairs("HER2Match", h2m, "test")
    assert [p.he.parent.parent.name for p in pairs] == ["HE_20x"] * 2
    assert all(p.he.name == p.ihc.name for p in pairs)
    item = PairedImages(pairs, size=64)[0]
    assert item["he"].shape == (3, 64, 64) and 0 <= item["he"].min() and item["he"].max() <= 1
    assert not torch.equal(item["he"], item["ihc"])
    ihc_only = PairedImages(pairs, size=64, sides=("ihc",))[1]
    assert set(ihc_only) == {"ihc", "index"}


def test_unpaired_and_missing_files_are_clear_errors(tmp_path, caplog):
    mist = make_mist(tmp_path / "MIST", n=3)
    write_image(mist / "HER2" / "TrainValAB" / "trainA" / "lonely_he.png", 64, 7)
    (mist / "HER2" / "TrainValAB" / "trainB" / "001.png").unlink()
    with pytest.raises(
        ValueError, match=r"unpaired images: 2 in .*trainA but not in .*trainB: 001\.png, lonely_he\.png"
    ):
        dataset_pairs("MIST", mist, "train")
    with caplog.at_level(logging.WARNING):
        pairs = dataset_pairs("MIST", mist, "train", on_unpaired="skip")
    assert [p.name for p in pairs] == ["000.png", "002.png"] and "skipped" in caplog.text

    with pytest.raises(FileNotFoundError, match=r"ER/TrainValAB/trainA: no such folder"):
        dataset_pairs("MIST", mist, "train", stain="ER")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        dataset_pairs("HER2Match", tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="MIST stain 'CD3'"):
        dataset_pairs("MIST", mist, "train", stain="CD3")
    with pytest.raises(ValueError, match="HER2Match split 'dev'"):
        dataset_pairs("HER2Match", make_her2match(tmp_path / "H"), "dev")
    with pytest.raises(ValueError, match="HER2Match has HER2 IHC only"):
        dataset_pairs("HER2Match", tmp_path / "H", "train", stain="PR")
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_pairs("BCI", mist, "train")


def test_bad_images_name_the_file(tmp_path):
    write_image(tmp_path / "ok.png", 64, 0)
    with pytest.raises(ValueError, match=r"ok\.png: expected a 1024x1024 image, got 64x64"):
        read_image(tmp_path / "ok.png", 1024)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png: cannot read the image"):
        read_image(tmp_path / "empty.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png: cannot read the image"):
        read_image(tmp_path / "cut.png")


def test_embedding_cache_round_trip_and_skips(tmp_path, tiny_uni_dir, caplog):
    from diffusion.encoders import load_uni

    root = make_her2match(tmp_path / "H2M", n=3, size=256)  # 256 px: one UNI token per image
    pairs = dataset_pairs("HER2Match", root, "train")
    uni = load_uni(tiny_uni_dir)
    out = compute_embeddings(
        pairs, uni, tmp_path / "emb.safetensors", image_size=256, num_workers=0, progress=False
    )
    cache = load_embeddings(out)
    assert cache.names == [p.name for p in pairs]
    assert cache.he.shape == cache.ihc.shape == (3, 1, 96) and cache.he.dtype == torch.float16
    direct = uni.embed_grid(read_image(pairs[2].ihc)[None])
    assert torch.allclose(cache.ihc[2].float(), direct[0], atol=2e-3 * direct.abs().max())
    # a cache for the same pairs is reused, not recomputed
    again = ensure_embeddings(pairs, "/does/not/matter", out)
    assert torch.equal(again.he, cache.he)

    # a truncated image: skipped with a count when allowed, an error past the threshold
    bad = pairs[1].he
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ValueError, match="1 unreadable pairs"):
        compute_embeddings(
            pairs, uni, tmp_path / "e2.safetensors", image_size=256, num_workers=0, progress=False
        )
    assert not (tmp_path / "e2.safetensors").exists()
    with caplog.at_level(logging.WARNING):
        compute_embeddings(
            pairs,
            uni,
            tmp_path / "e3.safetensors",
            image_size=256,
            num_workers=0,
            max_failure_rate=0.5,
            progress=False,
        )
    assert "1 skipped so far" in caplog.text
    assert load_embeddings(tmp_path / "e3.safetensors").names == [pairs[0].name, pairs[2].name]
    with pytest.raises(ValueError, match="multiple of 256"):
        compute_embeddings(pairs, uni, tmp_path / "e4.safetensors", image_size=200)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.safetensors: cannot read"):
        load_embeddings(tmp_path / "junk.safetensors")
