"""Inception-v3 features for FID/KID, exactly as clean-fid computes them (`mode='clean'`).

clean-fid's network is the TorchScript port of the TF-Inception used by the original FID
(`inception-2015-12-05.pt`, from NVIDIA's StyleGAN2-ADA release). clean-fid downloads it to /tmp on first use;
offline sites point at a local copy instead:

    --inception PATH   or   PIXCELL_INCEPTION=PATH      (the file, or a folder that holds it)

otherwise we look in `~/.cache/pixcell/` and clean-fid's /tmp location, then download into the cache (skipped
when HF_HUB_OFFLINE=1 or PIXCELL_OFFLINE=1). Preprocessing is clean-fid's own resizer (PIL bicubic to 299x299
on float pixels, no quantization) and its wrapper `InceptionV3W` (pixels (x - 128) / 128, pool3 features).
"""

from __future__ import annotations

import os
import shutil
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusion.atomic import atomic_path
from diffusion.metrics.features import FeatureExtractor, weights_fingerprint

INCEPTION_FILE = "inception-2015-12-05.pt"  # the name clean-fid's InceptionV3W loads
INCEPTION_DIM = 2048
INCEPTION_ENV = "PIXCELL_INCEPTION"
CLEANFID_DIR = Path("/tmp")  # where clean-fid itself downloads the file on Linux


class CleanResize:
    """clean-fid's `mode='clean'` resizer as a picklable per-image transform: (H, W, 3) uint8 -> (3, 299, 299)
    float32 in [0, 255]. Built lazily so DataLoader workers can receive it under any start method."""

    def __init__(self):
        self._fn = None

    def __getstate__(self) -> dict:
        return {"_fn": None}

    def __call__(self, image: np.ndarray) -> Tensor:
        if self._fn is None:
            from cleanfid.resize import build_resizer

            self._fn = build_resizer("clean")
        resized = self._fn(image)  # (299, 299, 3) float32, values in [0, 255]
        return torch.from_numpy(np.ascontiguousarray(resized, dtype=np.float32)).permute(2, 0, 1)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pixcell"


def find_inception(path: str | Path | None = None, download: bool | None = None) -> Path:
    """Locate (or download) `inception-2015-12-05.pt`; one clear error when it cannot be had."""
    how = f"pass --inception PATH or set {INCEPTION_ENV} to a local {INCEPTION_FILE}"
    explicit = path or os.environ.get(INCEPTION_ENV)
    if explicit:
        p = Path(explicit).expanduser()
        p = p / INCEPTION_FILE if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights {p}: no such file ({how})")
        if p.name != INCEPTION_FILE:
            raise ValueError(
                f"Inception weights {p}: clean-fid loads the file by the name {INCEPTION_FILE}; rename it"
            )
        return p
    candidates = [default_cache_dir() / INCEPTION_FILE, CLEANFID_DIR / INCEPTION_FILE]
    for p in candidates:
        if p.is_file():
            return p
    if download is None:
        download = not (os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("PIXCELL_OFFLINE") == "1")
    if not download:
        raise FileNotFoundError(
            f"Inception weights for FID/KID not found and downloads are off (offline): {how}"
        )
    from cleanfid.downloads_helper import inception_url

    target = candidates[0]
    try:
        with atomic_path(target) as tmp, urllib.request.urlopen(inception_url, timeout=60) as response:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
    except OSError as err:
        raise RuntimeError(
            f"cannot download the Inception weights ({type(err).__name__}: {err}); {how}"
        ) from None
    return target


def load_inception(
    path: str | Path | None = None, device: str | torch.device = "cpu", download: bool | None = None
) -> FeatureExtractor:
    """clean-fid's Inception-v3 (pool3, 2048-d) as a FeatureExtractor; see the module doc for `path`."""
    from cleanfid.inception_torchscript import InceptionV3W

    file = find_inception(path, download)
    device = torch.device(device)
    try:
        with (
            warnings.catch_warnings()
        ):  # torch deprecates jit.load; clean-fid's file is TorchScript regardless
            warnings.simplefilter("ignore", FutureWarning)
            model = InceptionV3W(str(file.parent), download=False, resize_inside=False).to(device).eval()
    except Exception as err:
        raise ValueError(f"Inception weights {file}: cannot load ({type(err).__name__}: {err})") from None
    info = {
        "name": "inception",
        "source": str(file),
        "arch": "clean-fid InceptionV3W (TF-Inception pool3)",
        "input_size": 299,
        "resize": "clean-fid mode=clean (PIL bicubic, float)",
        "dim": INCEPTION_DIM,
        "weights": weights_fingerprint(model.base),
    }
    return FeatureExtractor("inception", model, CleanResize(), INCEPTION_DIM, device, info)
