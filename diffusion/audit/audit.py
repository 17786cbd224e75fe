"""The memorisation audit: for every synthetic image, its nearest training images and a copy verdict.

1. Candidates. Each encoder (UNI2-h, any timm encoder) embeds the training, synthetic and held-out reference
   images (features cached like tools/evaluate.py's); the `k` training images most cosine-similar to each
   synthetic image are its candidates (diffusion.audit.search: exact or faiss, millions of images).
2. Confirmation. Each candidate is compared with the synthetic image in pixel space (diffusion.audit.pixels:
   NCC over flips, 90-degree rotations and shifts, invariant to per-channel re-colouring, robust to JPEG). A
   score at or above `pixel_threshold` flags the image as a copy of that training image.
3. Yardstick. Held-out real images (same slides, never trained on) go through the same two steps. A synthetic
   image closer in encoder space to its nearest training image than any held-out image gets is marked
   `suspect` (reported, not flagged: by chance about 1 in (n_reference + 1) new images is); a held-out image
   over the pixel threshold means the reference overlaps the training set, and the audit says so.
4. Slide level (when slides are known: a dataset index as TRAIN, sampling manifests for the other sets): how
   often an image's nearest training image comes from its own slide, synthetic against held-out. A synthetic
   rate well above the held-out rate means the generator reproduces slide-specific appearance (CytoSyn's
   slide-level overfitting), even without copying any patch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion.audit.images import ImageSet
from diffusion.audit.pixels import match
from diffusion.audit.search import FeatureIndex
from diffusion.metrics.cache import FeatureCache
from diffusion.metrics.features import FeatureExtractor, embed_images


@dataclass
class AuditSettings:
    k: int = 3  # candidates per image and encoder, confirmed in pixel space
    pixel_threshold: float = 0.8  # NCC at or above: a copy (held-out H&E tiles score < 0.5; copies > 0.95)
    max_shift: int = 16  # px, at the comparison size
    size: int = 256  # px: images are compared at this size
    backend: str = "auto"  # feature search: auto, exact, flat, ivf (diffusion.audit.search)


def set_features(
    extractor: FeatureExtractor,
    images: ImageSet,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """(N, dim) features of an image set, from the cache when it has them."""

    def compute() -> np.ndarray:
        return embed_images(extractor, images, batch_size, num_workers, progress)

    if cache is None:
        return compute()
    return cache.get_or_compute(images, images.fingerprint, extractor, compute)[0]


def _quantiles(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {}
    q = np.percentile(x, [0, 5, 50, 95, 100])
    return {
        "min": float(q[0]),
        "p05": float(q[1]),
        "median": float(q[2]),
        "p95": float(q[3]),
        "max": float(q[4]),
    }


def _pixel_check(images: ImageSet, train: ImageSet, cands: list[list[int]], s: AuditSettings, progress: bool):
    """Best pixel match of each image over its candidates -> list of (score, train index, transform, shift)."""
    out = []
    for i in tqdm(range(len(images)), desc=f"pixel check {images.role}", unit="img", disable=not progress):
        matches = match(images.image(i), [train.image(j) for j in cands[i]], s.max_shift, s.size)
        b = int(np.argmax([m.score for m in matches]))
        out.append((matches[b].score, cands[i][b], matches[b].transform, matches[b].shift))
    return out


def audit(
    train: ImageSet,
    synthetic: ImageSet,
    reference: ImageSet | None,
    extractors: Sequence[Callable[[], FeatureExtractor]],  # loaded one at a time
    settings: AuditSettings | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Run the audit (module doc) -> {"per_image": [...], "reference": [...], "summary": {...}}."""
    s = settings or AuditSettings()
    sets = {"synthetic": synthetic, **({"reference": reference} if reference is not None else {})}
    near: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {role: {} for role in sets}
    enc_names, backend = [], None
    for load in extractors:
        extractor = load()
        enc_names.append(extractor.name)
        common = dict(cache=cache, batch_size=batch_size, num_workers=num_workers, progress=progress)
        index = FeatureIndex(set_features(extractor, train, **common), s.backend)
        backend = index.backend
        for role, images in sets.items():
            near[role][extractor.name] = index.search(set_features(extractor, images, **common), s.k)
        del extractor, index
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    first = enc_names[0]

    def candidates(role: str) -> list[list[int]]:
        n = len(sets[role])
        return [list(dict.fromkeys(int(j) for e in enc_names for j in near[role][e][1][i])) for i in range(n)]

    pixel = {
        role: _pixel_check(images, train, candidates(role), s, progress) for role, images in sets.items()
    }
    dist = {role: {e: 1 - near[role][e][0][:, 0] for e in enc_names} for role in sets}
    ref_min = {e: float(dist["reference"][e].min()) for e in enc_names} if reference is not None else {}

    def rows(role: str) -> list[dict]:
        images, out = sets[role], []
        for i, key in enumerate(images.keys):
            score, j, transform, shift = pixel[role][i]
            flagged = score >= s.pixel_threshold
            closer = [e for e in enc_names if e in ref_min and dist[role][e][i] < ref_min[e]]
            nn = j if flagged else int(near[role][first][1][i, 0])
            if flagged:
                reason = f"pixel copy of {train.keys[j]} (NCC {score:.3f}, {transform}, shift {shift[0]:+d},{shift[1]:+d} px)"
            elif closer and role == "synthetic":
                reason = f"closer to {train.keys[nn]} in {', '.join(closer)} space than any held-out image; no pixel copy"
            else:
                reason = ""
            scores = {f"{e}_distance": float(dist[role][e][i]) for e in enc_names}
            scores |= {
                "pixel_ncc": score,
                "pixel_match": train.keys[j],
                "transform": transform,
                "shift": list(shift),
            }
            out.append(
                {
                    "name": key,
                    "nearest_train": train.keys[nn],
                    "scores": scores,
                    "flagged": bool(flagged),
                    "suspect": bool(closer) and not flagged and role == "synthetic",
                    "reason": reason,
                }
            )
        return out

    per_image = rows("synthetic")
    ref_rows = rows("reference") if reference is not None else []
    warnings = []
    ref_over = [r["name"] for r in ref_rows if r["flagged"]]
    if ref_over:
        warnings.append(
            f"{len(ref_over)} held-out image(s) match a training image in pixel space (e.g. {ref_over[0]}): the "
            "reference overlaps the training set (overlapping or duplicated patches?); the yardstick is unreliable"
        )
    summary = {
        "n_synthetic": len(synthetic),
        "n_train": len(train),
        "n_reference": len(reference) if reference is not None else 0,
        "flagged": sum(r["flagged"] for r in per_image),
        "suspect": sum(r["suspect"] for r in per_image),
        "settings": asdict(s) | {"search_backend": backend},
        "encoders": {
            e: {
                "synthetic_distance": _quantiles(dist["synthetic"][e]),
                "reference_distance": _quantiles(dist["reference"][e]) if reference is not None else {},
                "closer_than_any_reference": int((dist["synthetic"][e] < ref_min[e]).sum())
                if ref_min
                else None,
            }
            for e in enc_names
        },
        "pixel_ncc": {
            "synthetic": _quantiles(np.array([p[0] for p in pixel["synthetic"]])),
            "reference": _quantiles(np.array([p[0] for p in pixel["reference"]]))
            if reference is not None
            else {},
        },
        "reference_flagged": len(ref_over),
        "slide_level": _slide_level(train, sets, near, first),
        "warnings": warnings,
    }
    return {"per_image": per_image, "reference": ref_rows, "summary": summary}


def _slide_level(train: ImageSet, sets: dict[str, ImageSet], near: dict, encoder: str) -> dict | None:
    """How often the nearest training image comes from the image's own slide, per set (None: slides unknown)."""
    out = {}
    for role, images in sets.items():
        nn = near[role][encoder][1][:, 0]
        pairs = [(images.slides[i], train.slides[int(nn[i])]) for i in range(len(images))]
        known = [(a, b) for a, b in pairs if a is not None and b is not None]
        if known:
            same = sum(a == b for a, b in known)
            out[role] = {"same_slide": same, "known": len(known), "rate": same / len(known)}
    if "synthetic" not in out:
        return None
    out["encoder"] = encoder
    out["n_train_slides"] = len({s for s in train.slides if s is not None})
    return out
