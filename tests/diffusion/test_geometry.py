"""diffusion/geometry.py: token <-> image size, crop sub-grids, and the one latent normalisation that training,
validation and sampling share (recorded beside the features, checked against the training config)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.config import load_config
from diffusion.data.features import read_npy_meta, read_packed_meta
from diffusion.encoders import latents_from_model, latents_to_model, load_vae
from diffusion.geometry import (
    SD35_LATENT_SCALE,
    SD35_LATENT_SHIFT,
    crop_token_indices,
    image_px_for_tokens,
    latent_norm,
    resolve_norm,
    to_model_latents,
    tokens_for_image_px,
    tokens_side,
)
from tests.helpers.paths import REPO

TINY = str(REPO / "configs" / "tiny" / "pixcell_tiny_256.py")
OTHER = (0.25, 0.75)  # a VAE normalisation that is not SD3.5's


@pytest.fixture(autouse=True)
def restore_logging():
    """The trainer points the root logger at this test's (captured) stderr: put the handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_tokens_and_image_sizes():
    assert [tokens_side(t) for t in (1, 4, 16)] == [1, 2, 4]
    assert [image_px_for_tokens(t) for t in (1, 4, 16)] == [256, 512, 1024]
    assert [tokens_for_image_px(p) for p in (256, 512, 1024)] == [1, 4, 16]
    with pytest.raises(ValueError, match="not a square"):
        tokens_side(8)
    with pytest.raises(ValueError, match="resolution 300: expected a multiple of 256"):
        tokens_for_image_px(300, "resolution")


def test_crop_token_indices_is_the_row_major_sub_grid():
    grid = np.arange(16).reshape(4, 4)  # token ids of a 1024 px patch, row-major
    for y, x, m in [(0, 0, 1), (2, 2, 2), (1, 0, 2), (0, 0, 4)]:
        assert crop_token_indices(4, y, x, m, m) == grid[y : y + m, x : x + m].reshape(-1).tolist()
    assert crop_token_indices((2, 3), 1, 1, 1, 2) == [4, 5]  # a (2, 3) region grid: rows of 3 tokens
    with pytest.raises(ValueError, match="outside a 4x4 grid"):
        crop_token_indices(4, 3, 3, 2, 2)


def test_resolve_norm_order_and_mismatch():
    sd35 = (SD35_LATENT_SHIFT, SD35_LATENT_SCALE)
    assert resolve_norm((None, None), None, "f") == sd35  # nothing recorded, nothing set: SD3.5
    assert resolve_norm((None, None), OTHER, "f") == OTHER  # the features' record
    assert resolve_norm(OTHER, OTHER, "f") == OTHER
    assert resolve_norm((0.25 + 1e-8, 0.75), OTHER, "f") == (0.25 + 1e-8, 0.75)  # rounding is not a mismatch
    with pytest.raises(ValueError, match=r"^f: latents normalised by a VAE with shift 0.25, scale 0.75, but the "
                       r"config sets vae_shift=0.0609, vae_scale=1.5305"):  # fmt: skip
        resolve_norm(sd35, OTHER, "f")
    with pytest.raises(ValueError, match="set both vae_shift and vae_scale"):
        resolve_norm((0.1, None), None, "f")


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory, tiny_vae_dir) -> Path:
    """The tiny VAE with another normalisation in its config (a VAE that is not SD3.5's)."""
    import shutil

    out = tmp_path_factory.mktemp("other_vae") / "vae"
    shutil.copytree(tiny_vae_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["shift_factor"], cfg["scaling_factor"] = OTHER
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def other_features(tmp_path_factory, other_vae, tiny_uni_dir) -> Path:
    """Two random 512 px patches encoded by `other_vae` (npy and packed) through tools.extract_features."""
    from PIL import Image

    from diffusion.data.index import write_index
    from tools.extract_features import main as extract_features

    root = tmp_path_factory.mktemp("other_features") / "patches"
    rng = np.random.default_rng(0)
    names = []
    for i in range(2):
        rel = f"syn/demo/single_512/slide/0_{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(root / rel)
        names.append(rel)
    write_index(root / "metadata" / "patch_names_all.hdf5", {"syn_512": names})
    argv = ["--root", str(root), "--vae", str(other_vae), "--uni", str(tiny_uni_dir), "--num-workers", "0",
            "--device", "cpu", "--format", "npy", "packed"]  # fmt: skip
    assert extract_features(argv) == 0
    return root


def test_extracted_features_record_the_vae_normalisation(other_features, other_vae):
    recorded = read_npy_meta(other_features)
    packed = read_packed_meta(other_features / "features_packed", "syn_512")
    vae = load_vae(other_vae)
    for meta in (recorded, packed):
        assert (meta["vae_shift"], meta["vae_scale"]) == latent_norm(vae) == OTHER


def test_run_configured_with_another_normalisation_fails_at_start_up(other_features, tmp_path, capsys):
    from train_scripts.train_pixcell import cli

    for fmt in ("npy", "packed"):
        argv = [TINY, "--work-dir", str(tmp_path / fmt), "--data-root", str(other_features), "--report-to", "none",
                "--cfg-options", f"data.feature_format={fmt}", "vae_shift=0.0609", "vae_scale=1.5305"]  # fmt: skip
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "latents normalised by a VAE with shift 0.25, scale 0.75" in err and "vae_shift=0.0609" in err
        assert not list((tmp_path / fmt).glob("checkpoint*")), "nothing trained"


def test_validation_vae_of_another_normalisation_fails_at_start_up(
    other_features, tiny_vae_dir, tmp_path, capsys
):
    from train_scripts.train_pixcell import cli

    # features of the `other` VAE, validated with the SD3.5-normalised tiny VAE: refused before any step
    argv = [TINY, "--work-dir", str(tmp_path / "w"), "--data-root", str(other_features), "--report-to", "none",
            "--cfg-options", "validation.every_steps=2", f"validation.vae={tiny_vae_dir}"]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"validation.vae {tiny_vae_dir}" in err, err


def test_training_validation_and_sampling_share_one_normalisation(other_features, other_vae):
    """The config resolves to the features' record; the trainer's normalisation (geometry.to_model_latents with the
    config's values) and the VAE-side one that validation and the pipelines decode with are the same map."""
    cfg = load_config(TINY, {"data.root": str(other_features)})
    assert (cfg.vae_shift, cfg.vae_scale) == OTHER
    vae = load_vae(other_vae)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    x_train = to_model_latents(z, cfg.vae_shift, cfg.vae_scale)  # what train_pixcell feeds the model
    torch.testing.assert_close(x_train, latents_to_model(z, vae), rtol=0, atol=0)  # ControlNet/LoRA trainers
    torch.testing.assert_close(latents_from_model(x_train, vae), z)  # decode_latents: validation and sampling
    # without a record the run falls back to SD3.5's values (the features made by the original code)
    assert (load_config(TINY).vae_shift, load_config(TINY).vae_scale) == (
        SD35_LATENT_SHIFT,
        SD35_LATENT_SCALE,
    )
