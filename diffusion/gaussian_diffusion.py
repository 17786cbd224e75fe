"""The noise process PixCell is trained with: 1000 linear-beta steps, eps prediction, learned variance.

Only what no library provides lives here: the forward process `q_sample` and the improved-DDPM hybrid
objective (Nichol & Dhariwal 2021, "Improved DDPM", Sec. 3.1): L = L_simple + L_vlb, where L_simple is the MSE on
eps and L_vlb the variational bound term that trains the variance with the mean detached (Eq. 16). The model
outputs 2C channels: eps (C) and v in [-1, 1] (C), with log Sigma = frac * log beta_t + (1 - frac) * log beta~_t,
frac = (v + 1) / 2 (Eq. 15). Sampling uses diffusers' schedulers (diffusion/sampling/samplers.py), not code of ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DiffusionLoss:
    """Per-sample loss terms, each (B,): loss = mse + vb."""

    loss: Tensor
    mse: Tensor
    vb: Tensor


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)) (iDDPM, as in PixArt)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class GaussianDiffusion:
    """Linear-beta DDPM with learned-range variance. All tables in float64, gathered per sample as float32."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_timesteps = num_timesteps
        # PixArt/ADM's "linear" schedule, scaled so that other step counts keep the same endpoints' meaning.
        scale = 1000 / num_timesteps
        betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7).
        self.posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        # log of the posterior variance, clipped: it is 0 at t = 0, so use the t = 1 value there.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    @staticmethod
    def _gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """table[t] shaped (B, 1, 1, ...) to broadcast against `like`."""
        out = table.to(t.device)[t].to(torch.float32)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(
        self, batch: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> Tensor:
        """t ~ U{0, ..., T-1} (PixArt trains with uniform timesteps)."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert q_sample given eps: x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
        return (
            self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._gather(self.posterior_mean_coef1, t, x_t) * x0
            + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return mean, self._gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

    def p_mean_logvar(self, model_out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from the 2C-channel model output (learned range)."""
        eps, v = model_out.chunk(2, dim=1)
        min_log = self._gather(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._gather(self.betas.log(), t, x_t)
        frac = (v + 1) / 2
        logvar = frac * max_log + (1 - frac) * min_log
        mean, _ = self.q_posterior(self.predict_x0(x_t, t, eps), x_t, t)
        return mean, logvar

    def vb_term(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_vlb per sample in bits/dim: KL(q || p) for t > 0, the decoder NLL at t = 0."""
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        mean, logvar = self.p_mean_logvar(model_out, x_t, t)
        kl = _mean_flat(_normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor
    ) -> DiffusionLoss:
        """Hybrid loss from the model output on x_t = q_sample(x0, t, noise).

        model_out: (B, 2C, H, W). The vb term sees the eps half detached, so it trains the variance only
        (iDDPM Sec. 3.1: "we apply a stop-gradient to the mu output for the L_vlb term").
        """
        c = x0.shape[1]
        if model_out.shape[1] != 2 * c:
            raise ValueError(
                f"model output has {model_out.shape[1]} channels, expected {2 * c} (eps + variance)"
            )
        eps, v = model_out[:, :c], model_out[:, c:]
        mse = _mean_flat((noise.float() - eps.float()) ** 2)
        frozen = torch.cat([eps.detach(), v], dim=1).float()
        vb = self.vb_term(frozen, x0.float(), x_t.float(), t)
        return DiffusionLoss(loss=mse + vb, mse=mse, vb=vb)
