"""Invariants of the noise process and the hybrid (eps MSE + variational bound) loss."""

from __future__ import annotations

import math

import torch

from diffusion.gaussian_diffusion import GaussianDiffusion


def test_schedule_endpoints_and_monotonicity():
    d = GaussianDiffusion()
    assert math.isclose(d.betas[0].item(), 1e-4) and math.isclose(d.betas[-1].item(), 0.02)
    assert (d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all()
    assert d.alphas_cumprod[-1] < 1e-4  # x_T is (almost) pure noise


def test_q_sample_endpoints_and_eps_x0_roundtrip():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    t0 = torch.zeros(4, dtype=torch.long)
    # t = 0: the data plus noise of std sqrt(beta_0) = 0.01; t = T: (almost) pure noise.
    assert (d.q_sample(x0, t0, noise) - x0 - 0.01 * noise).abs().max() < 1e-3
    tT = torch.full((4,), 999)
    assert (d.q_sample(x0, tT, noise) - noise).abs().max() < 0.05
    t = torch.tensor([0, 10, 500, 999])
    xt = d.q_sample(x0, t, noise)
    assert torch.allclose(d.predict_x0(xt, t, noise), x0, atol=1e-3)
    assert torch.allclose(d.predict_eps(xt, t, x0), noise, atol=1e-3)


def test_q_sample_has_the_right_marginal_variance():
    d = GaussianDiffusion()
    x0 = torch.zeros(20000)
    t = torch.full((20000,), 300)
    xt = d.q_sample(x0.view(-1, 1), t, torch.randn(20000, 1))
    assert abs(xt.var().item() - (1 - d.alphas_cumprod[300].item())) < 0.03


def test_hybrid_loss_is_minimal_for_the_true_noise_and_posterior_variance():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 4, 4, generator=g).clamp(-1, 1), torch.randn(3, 16, 4, 4, generator=g)
    t = torch.tensor([5, 50, 200])  # late t: beta_t ~ beta~_t, the variance hardly matters there
    xt = d.q_sample(x0, t, noise)
    v_post = -torch.ones_like(x0)  # v = -1 selects the posterior variance beta~_t exactly
    perfect = d.training_losses(torch.cat([noise, v_post], 1), x0, xt, t, noise)
    assert torch.allclose(perfect.mse, torch.zeros(3), atol=1e-10)
    assert torch.allclose(perfect.vb, torch.zeros(3), atol=1e-5)  # KL(q || p) = 0 for t > 0
    worse_eps = d.training_losses(torch.cat([noise + 0.3, v_post], 1), x0, xt, t, noise)
    worse_var = d.training_losses(torch.cat([noise, v_post + 1.5], 1), x0, xt, t, noise)
    assert (worse_eps.loss > perfect.loss).all() and (worse_var.vb > perfect.vb).all()
    assert torch.allclose(perfect.loss, perfect.mse + perfect.vb)


def test_vb_term_trains_only_the_variance():
    d = GaussianDiffusion()
    x0, noise = torch.randn(2, 16, 4, 4).clamp(-1, 1), torch.randn(2, 16, 4, 4)
    t = torch.tensor([0, 400])  # t = 0 uses the decoder likelihood
    xt = d.q_sample(x0, t, noise)
    out = torch.randn(2, 32, 4, 4, requires_grad=True)
    d.training_losses(out, x0, xt, t, noise).vb.sum().backward()
    assert out.grad[:, :16].abs().sum() == 0  # mean detached
    assert out.grad[:, 16:].abs().sum() > 0
