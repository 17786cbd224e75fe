"""Image folders for evaluation: listing, pairing by name, content hashing, decoding with clear errors.

A folder holds PNG, JPEG or TIFF files, possibly in subfolders. An image's *key* is its path relative to the
folder without the extension (`slide1/3_7.png` -> `slide1/3_7`): the conditional metrics pair a real image with
the synthetic image of the same key, which is how the sampling tools name their outputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from diffusion.geometry import IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageFolder:
    """The images of one folder, sorted by key. `files[i]` has key `keys[i]`."""

    root: Path
    role: str  # "REAL" or "SYN", used in error messages
    keys: tuple[str, ...]
    files: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.files)


def list_images(folder: str | Path, role: str = "folder") -> ImageFolder:
    """All images under `folder` (recursive, hidden files skipped), sorted by key; errors if there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{role} {root}: no such folder")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in rel.parts):
            continue
        if not path.is_file():
            continue
        key = rel.with_suffix("").as_posix()
        if key in found:
            raise ValueError(
                f"{role} {root}: {found[key].name} and {path.name} share the name {key!r} "
                "(images are paired by name without extension; keep one)"
            )
        found[key] = path
    if not found:
        raise ValueError(f"{role} {root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    keys = tuple(sorted(found))
    return ImageFolder(root=root, role=role, keys=keys, files=tuple(found[k] for k in keys))


def check_paired(real: ImageFolder, syn: ImageFolder, metric: str) -> None:
    """The paired metrics need the same image names in both folders; say which ones are missing."""
    real_keys, syn_keys = set(real.keys), set(syn.keys)
    if real_keys == syn_keys:
        return
    only_real = sorted(real_keys - syn_keys)
    only_syn = sorted(syn_keys - real_keys)
    parts = []
    if only_real:
        parts.append(f"{len(only_real)} REAL image(s) have no twin in SYN (e.g. {', '.join(only_real[:3])})")
    if only_syn:
        parts.append(f"{len(only_syn)} SYN image(s) have no twin in REAL (e.g. {', '.join(only_syn[:3])})")
    raise ValueError(
        f"{metric} pairs images by file name: {'; '.join(parts)}; drop the paired metrics or match the names"
    )


def image_sizes(folder: ImageFolder) -> dict[str, int]:
    """How many images of each size ("WxH" -> count, most common first), from the file headers (no decoding)."""
    counts: dict[str, int] = {}
    for path in folder.files:
        try:
            with Image.open(path) as im:
                size = f"{im.width}x{im.height}"
        except (OSError, ValueError):
            size = "unreadable"  # the embedding step names the file
        counts[size] = counts.get(size, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def content_hash(folder: ImageFolder, progress: bool = True) -> str:
    """Hash of every image's key and bytes: changes when any image is added, removed, renamed or edited."""
    total = hashlib.blake2b(digest_size=16)
    for key, path in tqdm(
        list(zip(folder.keys, folder.files)), desc=f"hashing {folder.role}", disable=not progress, leave=False
    ):
        file_hash = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                file_hash.update(chunk)
        total.update(key.encode() + b"\0" + file_hash.digest())
    return total.hexdigest()


def read_rgb(path: Path) -> np.ndarray:
    """Decode one image as (H, W, 3) uint8; any decoding problem becomes a ValueError naming the file."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # convert() forces a full decode: truncation shows here
    except Exception as err:  # PIL raises many types (OSError, UnidentifiedImageError, SyntaxError, ...)
        raise ValueError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None


class ImageDataset(torch.utils.data.Dataset):
    """Decodes images and applies an encoder's per-image transform (in DataLoader workers).

    Returns (index, tensor, error): a broken file comes back as an error string, so the main process can stop
    with one clear line instead of a worker traceback.
    """

    def __init__(
        self,
        files: Sequence,
        transform: Callable[[np.ndarray], Tensor],
        read: Callable[..., np.ndarray] = read_rgb,  # file entry -> (H, W, 3) uint8 (crops: the audit's)
    ):
        self.files = list(files)
        self.transform = transform
        self.read = read

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        try:
            return i, self.transform(self.read(self.files[i])), None
        except ValueError as err:
            return i, None, str(err)


def collate(batch: list[tuple[int, Tensor | None, str | None]]) -> tuple[list[int], list[Tensor], list[str]]:
    """Keeps tensors as a list: images of different sizes are resized by the encoder, not here."""
    errors = [e for _, _, e in batch if e is not None]
    return [i for i, _, _ in batch], [t for _, t, _ in batch if t is not None], errors
