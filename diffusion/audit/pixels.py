"""Pixel-space copy check: is image Q a transformed copy of image X?

The score is the best normalised cross-correlation (NCC) between Q's central part and X, over the 8
symmetries of the square (identity, 90/180/270-degree rotations, and each of them mirrored) and every shift up
to `max_shift` px. NCC is computed per colour channel and averaged, so a per-channel gain and offset (a slight
re-colouring, a stain shift) leaves it unchanged; JPEG re-compression lowers it by a few hundredths. Two
different patches of the same tissue score well below a copy (typically < 0.5 on H&E; docs/applications.md).

Cost: a coarse search at half resolution over all symmetries and shifts (one grouped convolution for all
candidates), then the best one refined at full resolution within +-2 px. Images are compared at `size` px
(256, the UNI tile) whatever their stored size, and the shift budget is in those pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TRANSFORMS = ("identity", "rot90", "rot180", "rot270", "flip", "rot90+flip", "rot180+flip", "rot270+flip")
_EPS = 1e-3  # variance floor: flat (background) regions never correlate by division noise


@dataclass(frozen=True)
class PixelMatch:
    """Best alignment of a query onto one candidate: NCC in [-1, 1], the symmetry applied to the candidate,
    and the shift (dy, dx) in px at the comparison size."""

    score: float
    transform: str
    shift: tuple[int, int]


def to_tensor(image: np.ndarray, size: int = 256) -> Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float32 in [0, 1] (antialiased resize when needed)."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x


def dihedral(x: Tensor) -> Tensor:
    """(..., C, H, W) -> (8, ..., C, H, W): the square's symmetries, in the order of TRANSFORMS."""
    rots = [torch.rot90(x, k, (-2, -1)) for k in range(4)]
    return torch.stack(rots + [r.flip(-1) for r in rots])


def _box_sum(x: Tensor, h: int, w: int) -> Tensor:
    """Sum of every h x w window of (..., H, W) -> (..., H-h+1, W-w+1), by an integral image."""
    ii = F.pad(x.double().cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    return (ii[..., h:, w:] - ii[..., :-h, w:] - ii[..., h:, :-w] + ii[..., :-h, :-w]).float()


def _window_var(images: Tensor, h: int, w: int) -> Tensor:
    """n * variance of every h x w window (plus the floor), from integral images."""
    n = h * w
    s1, s2 = _box_sum(images, h, w), _box_sum(images.square(), h, w)
    return (s2 - s1.square() / n).clamp_min(0) + n * _EPS**2


def _ncc(images: Tensor, template: Tensor, var: Tensor | None = None) -> Tensor:
    """NCC of a (3, h, w) template at every position of (N, 3, H, W) images -> (N, H-h+1, W-w+1), channel mean.

    The correlation is a product of Fourier transforms (the template is 100-200 px wide: direct convolution
    costs ~50x more on a CPU); window variances come from integral images (or `var`, precomputed).
    """
    c, h, w = template.shape
    big_h, big_w = images.shape[-2:]
    n = h * w
    t = template - template.mean(dim=(1, 2), keepdim=True)
    t = t / (t.square().sum(dim=(1, 2), keepdim=True) + n * _EPS**2).sqrt()
    spec = torch.fft.rfft2(images) * torch.fft.rfft2(t, s=(big_h, big_w)).conj()
    num = torch.fft.irfft2(spec, s=(big_h, big_w))[..., : big_h - h + 1, : big_w - w + 1]  # sum x * t'
    var = _window_var(images, h, w) if var is None else var
    return (num / var.sqrt()).mean(dim=1).clamp(-1, 1)


@torch.no_grad()
def match(
    query: np.ndarray, candidates: list[np.ndarray], max_shift: int = 16, size: int = 256
) -> list[PixelMatch]:
    """The best alignment of `query` onto each candidate (see the module doc) -> one PixelMatch each."""
    if not candidates:
        return []
    if not 0 <= max_shift < size // 4:
        raise ValueError(f"max_shift={max_shift}: expected 0 <= max_shift < {size // 4}")
    q = to_tensor(query, size)
    full = torch.stack([to_tensor(c, size) for c in candidates])  # (K, 3, S, S)
    k = len(candidates)
    # Coarse: half resolution (2x2 means commute with the symmetries), every symmetry and shift of every
    # candidate at once.
    half = max_shift // 2
    s2 = size // 2
    q2 = F.avg_pool2d(q[None], 2)[0]
    small = F.avg_pool2d(full, 2)  # (K, 3, S/2, S/2)
    th = s2 - 2 * half
    # A square window's variance map turns with the image: compute it once, not for each symmetry.
    var = dihedral(_window_var(small, th, th)).flatten(0, 1)
    c2 = dihedral(small).flatten(0, 1)  # (8K, 3, S/2, S/2)
    coarse = _ncc(c2, q2[:, half : s2 - half, half : s2 - half], var).view(8, k, -1)  # (8, K, (2 half + 1)^2)
    side = 2 * half + 1
    out = []
    m = max_shift
    template = q[:, m : size - m, m : size - m]
    for j in range(k):
        best = int(coarse[:, j].flatten().argmax())
        t, pos = divmod(best, side * side)
        cy, cx = divmod(pos, side)
        # Refine: full resolution, +-2 px around the coarse shift (positions are offsets into the candidate).
        y0 = min(max(2 * cy - 2, 0), 2 * m)
        x0 = min(max(2 * cx - 2, 0), 2 * m)
        y1, x1 = min(2 * cy + 2, 2 * m), min(2 * cx + 2, 2 * m)
        cand = torch.rot90(full[j], t % 4, (-2, -1))
        cand = cand.flip(-1) if t >= 4 else cand
        window = cand[:, y0 : y1 + size - 2 * m, x0 : x1 + size - 2 * m]
        fine = _ncc(window[None], template)[0]  # (y1 - y0 + 1, x1 - x0 + 1)
        fy, fx = divmod(int(fine.flatten().argmax()), fine.shape[1])
        score = max(float(fine.max()), float(coarse[t, j].max()))
        out.append(PixelMatch(score, TRANSFORMS[t], (y0 + fy - m, x0 + fx - m)))
    return out
