"""Reference-free token grids of any size: the UNI prior run by sliding windows over a token grid, and how
coherent a grid is.

The UNI prior (`model.py`) makes one m x m window of tokens (m = 4 for the 16-token prior of PixCell-1024). A
whole-slide grid is Gh x Gw tokens. As MultiDiffusion (Bar-Tal et al., ICML 2023, Eq. 3-5) does for image
latents, every Euler step of the prior's flow runs the prior on all m x m windows of the grid (at `stride`
tokens, plus a last window flush with each edge so any size is covered) and averages their velocities where
windows overlap:

    v(x_t) = sum_i P_i^T v_theta(P_i x_t, t, label) / sum_i P_i^T 1,      x_{t+dt} = x_t + dt v(x_t)

in the prior's standardised token space, then un-standardised. Neighbouring windows share tokens, so the grid
is coherent across window borders as the prior is within a window. With a one-token prior (m = 1) the windows
do not overlap and the tokens are drawn independently: that is today's per-token prior, the baseline the
coherence measures below tell apart.

The window of the grid prior need not be the PixCell model's (the whole-slide tool cuts the grid into PixCell's
own windows afterwards), and it should span the tissue's coherence length: overlapping windows only pass on what
each window decides, so regions come out about a window wide. On the demo slide (one tissue region in background,
autocorrelation about 0.14 out to 7 tokens) a 4 x 4 prior makes a patchwork of 4-token regions, about 22% below
the slide's neighbour cosine whichever of the three methods stitches it; a 6 x 6 prior reaches it (docs/wsi.md).
Any square m works here (`UNIPrior(num_tokens=m * m)`); its training windows come from slide grids
(`grid_windows`) or from parent patches of at least m x 256 px.

Coherence (computed on tokens centred by a reference mean, e.g. the real slide's, so that the component all
tokens share does not make every pair look alike; holes are skipped):

    neighbour_cosine   mean cosine between each token and its right and lower neighbours
    autocorrelation    for d = 1..8 tokens, mean <a, b> over pairs d apart (across and down) / mean |a|^2
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..flow import TIME_SCALE, euler_integrate
from ..sampling.samplers import guided_prediction
from .model import DEFAULT_FLOW_STEPS, UNIPrior

METHODS = ("multidiffusion", "shifted", "outpaint")


def shifted_origins(size: int, window: int, offset: int) -> list[int]:
    """Side-by-side windows whose grid starts at `offset - window`, each clipped inside [0, size - window]."""
    return sorted({min(max(o, 0), size - window) for o in range(offset - window, size, window)})


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Origins of windows of `window` over `size` at `stride`, plus one flush with the far edge."""
    if size < window:
        raise ValueError(f"grid side {size} tokens: smaller than the prior's {window} x {window} window")
    origins = list(range(0, size - window + 1, stride))
    if origins[-1] != size - window:
        origins.append(size - window)
    return origins


@torch.no_grad()
def sample_grid(
    prior: UNIPrior,
    rows: int,  # grid size in tokens
    cols: int,
    label: str | None = None,
    guidance: float = 1.0,  # w in v_u + w (v_c - v_u) for a label
    steps: int = DEFAULT_FLOW_STEPS,
    stride: int | None = None,  # tokens between windows; None: half a window (1 at least)
    generator: torch.Generator | None = None,  # the starting noise (CPU)
    window_batch: int = 1024,  # windows per prior forward
    method: str = "multidiffusion",  # 'shifted': side-by-side windows at a new offset each step; 'outpaint'
) -> np.ndarray:
    """A (rows, cols, C) float32 grid of UNI tokens from the prior, by sliding windows (see the module doc)."""
    if method not in METHODS:
        raise ValueError(f"grid prior method {method!r}: expected one of {', '.join(METHODS)}")
    m = int(round(prior.num_tokens**0.5))
    stride = max(1, m // 2) if stride is None else stride
    if stride < 1 or stride > m:
        raise ValueError(f"grid prior stride {stride}: expected 1..{m} tokens")
    ys, xs = window_origins(rows, m, stride), window_origins(cols, m, stride)
    positions = [(y, x) for y in ys for x in xs]
    param = next(prior.parameters())
    device = param.device
    count = torch.zeros(rows, cols, 1, device=device)
    for y, x in positions:
        count[y : y + m, x : x + m] += 1
    cond = prior.label_ids(label, 1)
    uncond = None
    if cond is not None:
        cond = cond.to(device)
        uncond = torch.full_like(cond, len(prior.labels))

    def model(x: Tensor, c: Tensor | None, t: Tensor) -> Tensor:
        return prior(x.to(param.dtype), t.to(param.dtype), c).float()

    shifts = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))

    def velocity(grid: Tensor, t: Tensor) -> Tensor:  # grid (1, rows, cols, C)
        nonlocal positions, count
        if method == "shifted":  # SpotDiffusion-style: a new random offset of the window lattice every step
            oy, ox = (int(v) for v in torch.randint(0, m, (2,), generator=shifts))
            positions = [(y, x) for y in shifted_origins(rows, m, oy) for x in shifted_origins(cols, m, ox)]
            count = torch.zeros(rows, cols, 1, device=device)
            for y, x in positions:
                count[y : y + m, x : x + m] += 1
        total = torch.zeros_like(grid[0])
        for a in range(0, len(positions), window_batch):
            chunk = positions[a : a + window_batch]
            windows = torch.stack([grid[0, y : y + m, x : x + m].reshape(m * m, -1) for y, x in chunk])
            n = len(chunk)
            c = cond.expand(n) if cond is not None else None
            u = uncond.expand(n) if uncond is not None else None
            v = guided_prediction(model, windows, t[0], c, u, guidance)  # (n, m*m, C)
            for i, (y, x) in enumerate(chunk):
                total[y : y + m, x : x + m] += v[i].reshape(m, m, -1)
        return (total / count)[None]

    noise = torch.randn(rows, cols, prior.channels, generator=generator).to(device)
    if method != "outpaint":
        x = euler_integrate(velocity, noise[None], steps)[0]
        return prior.unstandardise(x).float().cpu().numpy()
    # Outpainting: window by window in raster order; tokens an earlier window made are held on their own flow
    # path x_t = t x1 + (1 - t) x0 (replacement conditioning, Song et al. 2021, Sec. 5), so each new window is
    # the prior's sample given its overlap with the grid so far.
    done = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    out = torch.zeros_like(noise)
    for y, x in positions:
        z = noise[y : y + m, x : x + m].reshape(1, m * m, -1)
        known = done[y : y + m, x : x + m].reshape(1, m * m, 1)
        x1 = out[y : y + m, x : x + m].reshape(1, m * m, -1)

        def window_velocity(w: Tensor, t: Tensor) -> Tensor:
            return guided_prediction(model, w, t[0], cond, uncond, guidance)

        w = z.clone()
        dt = 1.0 / steps
        for i in range(steps):
            t = i * dt
            w = torch.where(known, t * x1 + (1 - t) * z, w)
            w = w + dt * window_velocity(w, torch.full((1,), TIME_SCALE * t, device=device))
        w = torch.where(known, x1, w)
        out[y : y + m, x : x + m] = w.reshape(m, m, -1)
        done[y : y + m, x : x + m] = True
    return prior.unstandardise(out).float().cpu().numpy()


def grid_windows(grid: np.ndarray, m: int, stride: int = 1) -> np.ndarray:
    """All m x m windows of a (rows, cols, C) grid without holes, at `stride`: (N, m*m, C) row-major token sets,
    the training samples of an m*m-token prior taken from slide grids."""
    rows, cols = grid.shape[:2]
    out = [
        grid[y : y + m, x : x + m].reshape(m * m, -1)
        for y in range(0, rows - m + 1, stride)
        for x in range(0, cols - m + 1, stride)
        if np.isfinite(grid[y : y + m, x : x + m]).all()
    ]
    if not out:
        raise ValueError(f"grid of {rows}x{cols} tokens: no complete {m}x{m} window")
    return np.stack(out).astype(np.float32)


#################################################################################
#                                   Coherence                                   #
#################################################################################


def _centred(grid: np.ndarray, center: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(grid, np.float64)
    valid = np.isfinite(g).all(axis=2)
    mean = g[valid].mean(axis=0) if center is None else np.asarray(center, np.float64)
    return np.where(valid[..., None], g - mean, 0.0), valid


def _pairs(g: np.ndarray, valid: np.ndarray, d: int) -> Sequence[tuple[np.ndarray, np.ndarray]]:
    """Token pairs d apart across and down, both valid: [(a, b), ...] as (N, C) arrays."""
    out = []
    if g.shape[1] > d:
        ok = valid[:, :-d] & valid[:, d:]
        out.append((g[:, :-d][ok], g[:, d:][ok]))
    if g.shape[0] > d:
        ok = valid[:-d] & valid[d:]
        out.append((g[:-d][ok], g[d:][ok]))
    return out


def neighbour_cosine(grid: np.ndarray, center: np.ndarray | None = None) -> float:
    """Mean cosine between adjacent tokens (right and down), tokens centred by `center` (default: the grid's mean)."""
    g, valid = _centred(grid, center)
    sims = []
    for a, b in _pairs(g, valid, 1):
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        sims.append((a * b).sum(axis=1) / np.maximum(na * nb, 1e-12))
    sims = np.concatenate(sims) if sims else np.array([np.nan])
    return float(sims.mean())


def autocorrelation(grid: np.ndarray, max_lag: int = 8, center: np.ndarray | None = None) -> list[float]:
    """Spatial autocorrelation at lags 1..max_lag tokens: mean <a, b> of pairs d apart / mean |a|^2 (centred)."""
    g, valid = _centred(grid, center)
    power = (g[valid] ** 2).sum(axis=1).mean()
    out = []
    for d in range(1, max_lag + 1):
        pairs = _pairs(g, valid, d)
        dots = [(a * b).sum(axis=1) for a, b in pairs if len(a)]
        out.append(float(np.concatenate(dots).mean() / power) if dots else float("nan"))
    return out


def coherence(grid: np.ndarray, center: np.ndarray | None = None, max_lag: int = 8) -> dict:
    """{'neighbour_cosine': ..., 'autocorrelation': [lag 1..max_lag]} of a grid."""
    return {
        "neighbour_cosine": neighbour_cosine(grid, center),
        "autocorrelation": autocorrelation(grid, max_lag, center),
    }
