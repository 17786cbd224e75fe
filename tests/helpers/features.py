"""Random stored features in the published npy layout, for trainer tests that need no real slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffusion.data.index import write_index
from diffusion.geometry import UNI_TILE, VAE_FACTOR


def write_random_features(root: Path, count: int, size: int, key: str) -> Path:
    """`count` random `size` px 'patches' in the published npy layout (VAE mean + constant logvar, 96-d UNI tokens
    of the stand-in) and their index under `key`; also the LoRA trainer's test data."""
    rng = np.random.default_rng(0)
    lat, tokens = size // VAE_FACTOR, (size // UNI_TILE) ** 2
    names = []
    for i in range(count):
        stem = root / "syn" / "demo" / "single_1024" / "slide" / f"0_{i}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        vae = np.concatenate([rng.normal(size=(16, lat, lat)), np.full((16, lat, lat), 0.1)]).astype(
            np.float16
        )
        np.save(f"{stem}_sd3_vae.npy", vae)
        np.save(f"{stem}_uni.npy", rng.normal(size=(tokens, 96)).astype(np.float16))
        names.append(f"syn/demo/single_1024/slide/0_{i}.png")
    write_index(root / "metadata" / "patch_names_all.hdf5", {key: names})
    return root
