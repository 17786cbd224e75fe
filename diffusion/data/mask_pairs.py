"""Cell masks for the ControlNet: reading, rendering as the published code did, and (image, mask) folder pairs.

Rendering (published PixCell-256-Cell-ControlNet usage and training code): every pixel of a cell is white, the
background black, as an RGB image; `mask > 0` for a binary mask or an instance map (0 = background, 1..K = cells),
so instance ids only mark foreground. The rendering (3, H, W) in {0, 1} goes through the VAE like an image
(scaled to [-1, 1], posterior mean, then `(z - shift) * scale`) to become the ControlNet's conditioning latent.

Folder layout for training (`MaskPairDataset`):

    images/<name>.png|jpg|jpeg|tif      H&E patches, `size` x `size` px
    masks/<name>.png                    binary or instance mask of the same size (same relative path)
    <features>/<name>_uni.npy           UNI2-h embeddings (T, 1536), float16, as the feature tools write them
                                        (`features_dir` defaults to the images folder: features beside the patch)

Masks are checked up front (mode and size, from the PNG header); a bad pair is logged with a running count and
skipped, and the dataset refuses to start when more than `max_failure_rate` of the pairs are bad.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from diffusion.geometry import IMAGE_SUFFIXES, UNI_TILE

if TYPE_CHECKING:
    from diffusion.encoders import UNIEncoder

log = logging.getLogger("pixcell.data")

UNI_SUFFIX = "_uni.npy"
# PIL modes of a label image: binary, 8/16/32-bit gray, palette (ids as palette indices). Gray RGB is accepted
# too (a mask already rendered as in the published example); anything with colour or alpha is refused.
LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F")
MaskLike = str | Path | Image.Image | np.ndarray | Tensor


#################################################################################
#                            Reading and rendering                              #
#################################################################################


def render_mask(labels: np.ndarray | Tensor, name: str = "mask") -> Tensor:
    """Binary or instance mask -> the published rendering, (3, H, W) float32 in {0, 1} (cells white).

    labels: (H, W) ids or booleans; (H, W, 3) / (3, H, W) gray RGB; (1, H, W). Colour is a ValueError.
    """
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # channels first -> last
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise ValueError(
                f"{name}: colour RGB image; expected a binary or instance mask (one channel, 0 = background) "
                "or a gray rendering (R = G = B)"
            )
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(
            f"{name}: mask of shape {arr.shape}; expected (H, W) labels, (H, W, 3) gray RGB or (1|3, H, W)"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name}: mask contains NaN or Inf")
    fg = torch.from_numpy(np.ascontiguousarray(arr > 0)).float()  # (H, W)
    return fg.unsqueeze(0).expand(3, -1, -1).contiguous()


def read_mask(path: str | Path, size: int | None = None) -> Tensor:
    """Read a mask PNG and render it: (3, H, W) in {0, 1}. `size`: the required side in px (else ValueError)."""
    path = Path(path)
    with open_mask(path, size) as img:
        if img.mode == "RGB":
            arr = np.asarray(img)
        elif img.mode == "P":  # palette: the stored indices are the labels
            arr = np.array(img, dtype=np.int64)
        else:
            arr = np.asarray(img)
    return render_mask(arr, str(path))


def open_mask(path: str | Path, size: int | None = None) -> Image.Image:
    """Open a mask and check its mode and size from the header (cheap: nothing decoded yet)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mask not found")
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image ({type(err).__name__})") from None
    if img.mode not in LABEL_MODES and img.mode != "RGB":
        img.close()
        raise ValueError(
            f"{path}: mask mode {img.mode} ({len(img.getbands())} channels); expected a one-channel binary or "
            "instance mask (modes 1/L/P/I;16/I) or a gray RGB rendering, without alpha"
        )
    if size is not None and img.size != (size, size):
        img.close()
        raise ValueError(
            f"{path}: mask is {img.size[0]}x{img.size[1]} px, expected {size}x{size} (the image size)"
        )
    return img


def masks_to_tensor(masks: MaskLike | Sequence[MaskLike], size: int) -> Tensor:
    """Masks in any accepted form (path, PIL image, array, tensor, or a list of them) -> (B, 3, size, size).

    A (B, H, W) or (B, 1|3, H, W) tensor/array is a batch; anything else is one mask per list item.
    """
    if isinstance(masks, (Tensor, np.ndarray)) and np.ndim(masks) == 4:
        items: list = list(masks)
    elif isinstance(masks, (Tensor, np.ndarray)) and np.ndim(masks) == 3 and masks.shape[-1] != 3:
        first = masks.shape[0]
        items = [masks] if first in (1, 3) and masks.shape[1] == size else list(masks)
    elif isinstance(masks, (list, tuple)):
        items = list(masks)
    else:
        items = [masks]
    out = []
    for i, m in enumerate(items):
        name = f"mask {i}"
        if isinstance(m, (str, Path)):
            out.append(read_mask(m, size))
            continue
        if isinstance(m, Image.Image):
            if m.mode not in LABEL_MODES and m.mode != "RGB":
                raise ValueError(f"{name}: PIL mode {m.mode}; expected a one-channel or gray RGB mask")
            m = np.array(m, dtype=np.int64) if m.mode == "P" else np.asarray(m)
        rendered = render_mask(m, name)
        if rendered.shape[-2:] != (size, size):
            h, w = rendered.shape[-2:]
            raise ValueError(f"{name}: mask is {w}x{h} px, expected {size}x{size} (the image size)")
        out.append(rendered)
    if not out:
        raise ValueError("masks: empty list")
    return torch.stack(out)


#################################################################################
#                               Folder pairs                                    #
#################################################################################


class MaskPairDataset(Dataset):
    """(image, mask, UNI) triples from folders; see the module docstring for the layout.

    Items: dict(image (3, S, S) float in [0, 1], mask (3, S, S) rendered in {0, 1}, uni (T, C) float32, name).
    """

    def __init__(
        self,
        image_dir: str | Path,
        mask_dir: str | Path,
        features_dir: str | Path | None = None,
        size: int = 256,
        uni_dim: int = 1536,
        max_failure_rate: float = 0.01,
        require_uni: bool = True,
    ):
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        self.features_dir = Path(features_dir) if features_dir is not None else self.image_dir
        self.size = size
        self.uni_shape = ((size // UNI_TILE) ** 2, uni_dim)
        for what, folder in (("image", self.image_dir), ("mask", self.mask_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} folder {folder}: no such folder")
        images = sorted(
            p for p in self.image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        # Features written beside the images share the folder; only the images count.
        if not images:
            raise ValueError(f"{self.image_dir}: no images ({'/'.join(IMAGE_SUFFIXES)})")
        self.items: list[tuple[Path, Path, Path]] = []
        failed = 0
        for k, img in enumerate(images):
            rel = img.relative_to(self.image_dir)
            mask = self.mask_dir / rel.with_suffix(".png")
            uni = self.uni_path(img)
            try:
                self._check_pair(img, mask, uni if require_uni else None)
            except (ValueError, FileNotFoundError) as err:
                failed += 1
                log.warning("skip %s: %s [%d of %d pairs skipped so far]", rel, err, failed, k + 1)
                if failed / len(images) > max_failure_rate:
                    raise ValueError(
                        f"{failed} of {len(images)} (image, mask) pairs are bad (> max_failure_rate "
                        f"{max_failure_rate:.1%}); last: {err}"
                    ) from None
                continue
            self.items.append((img, mask, uni))
        if not self.items:
            raise ValueError(f"{self.image_dir}: no usable (image, mask) pairs")

    def uni_path(self, image: Path) -> Path:
        rel = image.relative_to(self.image_dir)
        return self.features_dir / rel.parent / f"{rel.stem}{UNI_SUFFIX}"

    def _check_pair(self, image: Path, mask: Path, uni: Path | None) -> None:
        try:
            with Image.open(image) as img:
                if img.size != (self.size, self.size):
                    raise ValueError(
                        f"{image}: image is {img.size[0]}x{img.size[1]} px, expected {self.size}"
                    )
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{image}: not a readable image ({type(err).__name__})") from None
        with open_mask(mask, self.size) as m:
            rgb = m.mode == "RGB"
        if rgb:  # only decoding tells a gray rendering from a colour image
            read_mask(mask, self.size)
        if uni is not None:
            self.read_uni(uni)

    def read_uni(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: UNI features missing (extract them with the feature tools, or set pairs.uni to a "
                "UNI2-h source so the trainer writes them)"
            )
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{path}: unreadable .npy ({type(err).__name__})") from None
        if tuple(arr.shape) != self.uni_shape:
            raise ValueError(
                f"{path}: UNI features of shape {tuple(arr.shape)}, expected {self.uni_shape} (T tokens, dim)"
            )
        return arr

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image_path, mask_path, uni_path = self.items[i]
        try:
            with Image.open(image_path) as img:
                image = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255.0
        except OSError as err:  # truncated after the header check
            raise ValueError(f"{image_path}: cannot decode ({err})") from None
        uni = torch.from_numpy(np.array(self.read_uni(uni_path), dtype=np.float32))
        if not torch.isfinite(uni).all():
            raise ValueError(f"{uni_path}: UNI features contain NaN or Inf")
        return {
            "image": image,  # (3, S, S)
            "mask": read_mask(mask_path, self.size),  # (3, S, S)
            "uni": uni,  # (T, C)
            "name": str(image_path.relative_to(self.image_dir)),
        }


@torch.no_grad()
def write_missing_uni(
    dataset: MaskPairDataset, uni_encoder: UNIEncoder, batch_size: int = 32, progress: bool = True
) -> int:
    """Embed every image of `dataset` whose `<name>_uni.npy` is missing, with `uni_encoder` (`load_uni`).

    Writes float16 (T, C) files (the published per-patch format), atomically. Returns the number written.
    """
    from tqdm.auto import tqdm

    from ..atomic import atomic_path

    todo = [(img, uni) for img, _, uni in dataset.items if not uni.is_file()]
    for start in tqdm(range(0, len(todo), batch_size), desc="UNI features", disable=not progress):
        chunk = todo[start : start + batch_size]
        images = []
        for img, _ in chunk:
            with Image.open(img) as im:
                images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255.0)
        device = next(uni_encoder.parameters()).device
        feats = uni_encoder.embed_grid(torch.stack(images).to(device)).cpu().numpy().astype(np.float16)
        for (_, out), f in zip(chunk, feats):
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp, open(tmp, "wb") as fh:
                np.save(fh, f)
    return len(todo)
