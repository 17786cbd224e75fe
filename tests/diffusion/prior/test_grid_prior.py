"""The grid prior: a UNI prior of m x m tokens run by sliding windows over a token grid of any size, against the
demo slide's real grid and against today's per-token prior, by neighbour cosine and autocorrelation.

The window is matched to the slide's coherence length: the slide is one tissue region in background, correlated
over 5-7 tokens, and a 4 x 4 prior makes a patchwork of window-sized regions (about 22% below the real neighbour
cosine, benchmarks/bench_grid_prior.py), so the prior here is 6 x 6, trained 400 steps on the 18 windows of the
real slide's grid (tiny UNI with random features). Measured: 0.58 against the real 0.64 (-10%, 8 seeds; -1% after
900 steps), the per-token prior 0.00; the test asserts the issue's target, within 20%, over 6 seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.encoders import load_uni
from diffusion.flow import flow_matching_loss
from diffusion.prior.grid import coherence, grid_windows, sample_grid, shifted_origins, window_origins
from diffusion.prior.model import UNIPrior
from diffusion.sampling.grids import grid_from_slide
from diffusion.standins import build_tiny_uni

pytestmark = pytest.mark.usefixtures("one_thread")


def train_prior(windows: np.ndarray, m: int, steps: int, width: int, depth: int) -> UNIPrior:
    torch.manual_seed(0)
    data = torch.from_numpy(windows)
    prior = UNIPrior(num_tokens=m * m, channels=data.shape[2], width=width, depth=depth, num_heads=2)
    flat = data.reshape(-1, data.shape[2])
    prior.set_data_stats(flat.mean(0), flat.std(0))
    x1 = prior.standardise(data)
    opt = torch.optim.AdamW(prior.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = x1[torch.randint(0, len(x1), (40,), generator=gen)]
        loss = flow_matching_loss(prior, torch.randn(batch.shape, generator=gen), batch, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return prior.eval()


def test_window_layouts():
    assert window_origins(11, 4, 2) == [0, 2, 4, 6, 7]  # plus one flush with the far edge
    assert shifted_origins(11, 4, 1) == [0, 1, 5, 7]  # side by side from offset 1 - 4, clipped inside
    with pytest.raises(ValueError, match="smaller than the prior's 4 x 4 window"):
        window_origins(3, 4, 1)


def test_grid_prior_is_coherent_where_the_per_token_prior_is_not(real_slide, tmp_path):
    build_tiny_uni(tmp_path / "uni", init_values=None)  # random features that differ between tiles
    real = grid_from_slide(real_slide, load_uni(tmp_path / "uni")).tokens  # (11, 8, 96)
    center = real.reshape(-1, real.shape[2]).mean(axis=0)
    target = coherence(real, center)
    assert target["neighbour_cosine"] > 0.5  # the slide's neighbours are alike (one tissue, one background)
    per_token = train_prior(grid_windows(real, 1), 1, 150, 64, 2)
    grid_prior = train_prior(grid_windows(real, 6), 6, 400, 128, 1)
    scores = {}
    for name, prior in (("per-token", per_token), ("grid", grid_prior)):
        grids = [
            sample_grid(prior, 11, 8, steps=30, generator=torch.Generator().manual_seed(s)) for s in range(6)
        ]
        assert grids[0].shape == real.shape and np.isfinite(grids[0]).all()
        scores[name] = [coherence(g, center) for g in grids]
    gap = {
        k: 1 - np.mean([s["neighbour_cosine"] for s in v]) / target["neighbour_cosine"]
        for k, v in scores.items()
    }
    lag1 = {k: np.mean([s["autocorrelation"][0] for s in v]) for k, v in scores.items()}
    assert gap["per-token"] > 0.8 and abs(lag1["per-token"]) < 0.1  # independent tokens: no coherence at all
    # The target: the grid prior's whole grids within 20% of the slide's neighbour cosine (mean of 6 seeds).
    assert gap["grid"] < 0.2 and lag1["grid"] > 0.3, (gap, lag1)
    # Any size, not only whole windows: a 13 x 6 grid (windows flush with the edges), the outpainting order too.
    odd = sample_grid(
        grid_prior, 13, 6, steps=5, method="outpaint", generator=torch.Generator().manual_seed(0)
    )
    assert odd.shape == (13, 6, real.shape[2]) and np.isfinite(odd).all()
