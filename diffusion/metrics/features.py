"""A feature extractor (any encoder) and the one loop that embeds a folder of images with it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion.metrics.images import ImageDataset, ImageFolder, collate, read_rgb


@dataclass
class FeatureExtractor:
    """One encoder, ready to embed images: one feature vector per image.

    transform runs per image in DataLoader workers ((H, W, 3) uint8 -> (3, h, w) tensor); model maps a batch
    of transformed images (B, 3, h, w) on `device` to features (B, dim). `info` describes the encoder and its
    preprocessing (it goes into the report); `fingerprint` identifies the features it produces (cache key).
    """

    name: str
    model: Callable[[Tensor], Tensor]
    transform: Callable[[np.ndarray], Tensor]
    dim: int
    device: torch.device
    info: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        # Everything that changes the features, nothing that does not (the user's name for the encoder,
        # where its weights live): the same encoder reuses its cached features under any name or path.
        keys = {k: v for k, v in self.info.items() if k not in ("name", "source", "description")}
        return hashlib.blake2b(
            json.dumps(keys, sort_keys=True, default=str).encode(), digest_size=16
        ).hexdigest()


def to_uint8_chw(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8 tensor; the encoder does its own resize and normalization."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity for a set of weights: names, shapes and a strided sample of every tensor.

    Hashing all 2.7 GB of UNI2-h would take seconds per run; a sample of up to 1024 values per tensor tells
    different checkpoints apart just as well (any retraining moves every tensor).
    """
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


@torch.inference_mode()
def embed_images(
    extractor: FeatureExtractor,
    folder: ImageFolder,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Embed every image of `folder` -> (N, dim) float32, row i for `folder.files[i]`.

    A broken image stops the run with a ValueError naming the file: a metric computed on a silently
    shrunken set would not be comparable with anything.
    `folder` may be any set with `files`, `role` and `__len__`; a `read` method, when it has one, decodes its
    entries (the memorisation audit's crops of dataset patches), else they are image files.
    """
    loader = torch.utils.data.DataLoader(
        ImageDataset(folder.files, extractor.transform, getattr(folder, "read", read_rgb)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        shuffle=False,
    )
    feats = np.zeros((len(folder), extractor.dim), np.float32)
    bar = tqdm(total=len(folder), desc=f"{extractor.name} {folder.role}", unit="img", disable=not progress)
    for indices, images, errors in loader:
        if errors:
            raise ValueError(errors[0])
        if all(x.shape == images[0].shape for x in images):
            out = extractor.model(torch.stack(images).to(extractor.device))  # (B, dim)
        else:  # mixed image sizes: each is resized by the encoder on its own
            out = torch.cat([extractor.model(x[None].to(extractor.device)) for x in images])
        if out.shape != (len(images), extractor.dim):
            raise ValueError(
                f"encoder {extractor.name}: expected ({len(images)}, {extractor.dim}), got {out.shape}"
            )
        feats[indices] = out.float().cpu().numpy()
        bar.update(len(images))
    bar.close()
    if not np.isfinite(feats).all():
        raise ValueError(f"encoder {extractor.name}: non-finite features on {folder.role} (try --dtype fp32)")
    return feats
