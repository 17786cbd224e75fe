"""On-disk cache of folder features, keyed by (folder content hash, encoder fingerprint).

Evaluating many generators against one reference set embeds that set once per encoder. The key covers the
bytes and names of every image (`images.content_hash`) and everything that changes the features: weights,
input size, mean/std, pooling, dtype (`FeatureExtractor.fingerprint`). Editing, adding or renaming one image
changes the key, so a stale entry is never read; old entries are just files that can be deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffusion.atomic import atomic_path
from diffusion.metrics.features import FeatureExtractor
from diffusion.metrics.images import ImageFolder
from diffusion.writable import check_writable

CACHE_VERSION = 1  # bump when the feature computation changes in a way the fingerprint cannot see
CACHE_ENV = "PIXCELL_EVAL_CACHE"


def default_feature_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pixcell" / "eval_features"


class FeatureCache:
    """Features of image folders under `root`, one `.npz` per (folder content, encoder)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, folder_hash: str, extractor: FeatureExtractor) -> Path:
        key = json.dumps([CACHE_VERSION, folder_hash, extractor.fingerprint])
        # no encoder name in the file name: one encoder under two names or paths shares its entries
        return self.root / f"{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}.npz"

    def load(self, folder: ImageFolder, folder_hash: str, extractor: FeatureExtractor) -> np.ndarray | None:
        """Cached (N, dim) features, or None when absent or unreadable (then they are recomputed)."""
        path = self.path(folder_hash, extractor)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                feats, keys = data["feats"], data["keys"]
        except Exception:  # a damaged entry is recomputed and rewritten, never trusted
            return None
        if feats.shape != (len(folder), extractor.dim) or tuple(keys.tolist()) != folder.keys:
            return None
        return feats

    def save(
        self, folder: ImageFolder, folder_hash: str, extractor: FeatureExtractor, feats: np.ndarray
    ) -> Path:
        path = self.path(folder_hash, extractor)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
                np.savez(f, feats=feats.astype(np.float32), keys=np.array(folder.keys))
        return path

    def get_or_compute(
        self,
        folder: ImageFolder,
        folder_hash: str,
        extractor: FeatureExtractor,
        compute: Callable[[], np.ndarray],
    ) -> tuple[np.ndarray, bool]:
        """-> (features, True if they came from the cache)."""
        feats = self.load(folder, folder_hash, extractor)
        if feats is not None:
            return feats, True
        feats = compute()
        self.save(folder, folder_hash, extractor, feats)
        return feats, False


def open_feature_cache(cache_dir: str | Path | None, enabled: bool = True) -> FeatureCache | None:
    """The cache a tool asks for: `cache_dir` (default `default_feature_cache_dir()`), or None when disabled. Its
    folder is checked writable here, before the encoders load and embed, not when the first entry is saved."""
    if not enabled:
        return None
    root = cache_dir or default_feature_cache_dir()
    check_writable(root, "`cache_dir`")
    return FeatureCache(root)
