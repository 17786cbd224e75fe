"""Latent consistency distillation (LCD): a few-step student with classifier-free guidance built in.

Luo et al. 2023, "Latent Consistency Models", Algorithm 1 (LCD), as in PixArt-alpha's LCM and diffusers'
`train_lcm_distill_*` scripts, written for PixCell's noise process (1000 linear betas, eps prediction):

    n ~ U{0..N-1}, t_{n+k} = SKIP_STEP (n + 1) - 1 (19, 39, ..., 999), t_n = max(t_{n+k} - SKIP_STEP, 0)
    w ~ U[w_min, w_max]                                   the guidance scale, an input of the student
    x_{t_{n+k}} = q_sample(x_0, t_{n+k}, z)
    eps_T  = eps_u + w (eps_c - eps_u)                    the teacher's guided prediction (`guided_prediction`)
    x_{t_n} = DDIM(x_{t_{n+k}} -> t_n; eps_T)              one deterministic solver step (eta = 0)
    f(x, t, w) = c_skip(t) x + c_out(t) x0(x, t, eps_student(x, t, w))     (LCM Eq. 9 boundary conditions)
    loss = d(f_theta(x_{t_{n+k}}, t_{n+k}, w), f_theta^-(x_{t_n}, t_n, w))  theta^- = EMA of theta (the target)

with c_skip = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 + s^2), s = 0.5 (`timestep_scaling` = 10 of
diffusers' LCMScheduler, which samples the student with the same boundary conditions and skipping steps) and d the
pseudo-Huber distance sqrt(|a - b|^2 + c^2) - c (Song & Dhariwal 2023; LCM-LoRA uses it). Models are plain
callables, so the same code distils the PixCell transformer and the toy models of the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..gaussian_diffusion import GaussianDiffusion
from ..sampling.samplers import guided_prediction

SKIP_STEP = 20  # 1000 / 50: LCMScheduler(original_inference_steps=50) samples on these timesteps
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0

# (x, cond, t) -> output whose first C channels are eps (the teacher; 2C with the learned variance)
TeacherFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# (x, cond, t, w) -> output whose first C channels are eps (the student and its EMA target)
StudentFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def boundary_coefficients(t: Tensor) -> tuple[Tensor, Tensor]:
    """LCM's c_skip(t), c_out(t) (B,) for integer timesteps t (B,): c_skip(0) = 1, c_out(0) = 0, so f(x, 0) = x."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))).to(like)


@dataclass
class DistillLoss:
    """One LCD step's loss (scalar, to backpropagate) and the per-sample distances (B,)."""

    loss: Tensor
    distance: Tensor


class ConsistencyDistiller:
    """The LCD objective for any teacher/student callables over PixCell's noise process."""

    def __init__(
        self,
        guidance_range: tuple[float, float] = (
            1.0,
            3.0,
        ),  # w ~ U[low, high] (our convention: eps_u + w (...))
        huber_c: float | None = 1e-3,  # pseudo-Huber constant; None: squared L2
        diffusion: GaussianDiffusion | None = None,
    ):
        low, high = guidance_range
        if not 0 <= low <= high:
            raise ValueError(f"guidance_range {guidance_range}: expected 0 <= low <= high")
        self.guidance_range = (float(low), float(high))
        self.huber_c = huber_c
        self.diffusion = diffusion or GaussianDiffusion()
        self.num_solver_steps = self.diffusion.num_timesteps // SKIP_STEP

    def consistency_fn(self, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """f(x_t, t) = c_skip x_t + c_out x0(eps): the student's estimate of x_0."""
        c_skip, c_out = boundary_coefficients(t)
        x0 = self.diffusion.predict_x0(x_t, t, eps)
        return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * x0

    def sample_inputs(
        self, batch: int, device: torch.device, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(t_start (B,), t_prev (B,), w (B,)) for one step: a skipping-step pair and a guidance scale."""
        n = torch.randint(0, self.num_solver_steps, (batch,), device=device, generator=generator)
        t_start = (n + 1) * SKIP_STEP - 1
        t_prev = (t_start - SKIP_STEP).clamp(min=0)
        low, high = self.guidance_range
        w = low + (high - low) * torch.rand(batch, device=device, generator=generator)
        return t_start, t_prev, w

    def loss(
        self,
        student: StudentFn,
        target: StudentFn,  # the EMA target network, run without gradient
        teacher: TeacherFn,
        x0: Tensor,  # (B, C, ...) clean latents
        cond: Tensor,  # (B, T, C_uni)
        uncond: Tensor,  # (B, T, C_uni) the teacher's null condition
        generator: torch.Generator | None = None,
    ) -> DistillLoss:
        c = x0.shape[1]
        t_start, t_prev, w = self.sample_inputs(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        x_start = self.diffusion.q_sample(x0, t_start, noise)
        with torch.no_grad():
            # The teacher's guided ODE step t_{n+k} -> t_n (DDIM, eta = 0: x0 and eps re-noised to t_prev).
            eps_t = guided_prediction(teacher, x_start, t_start, cond, uncond, w)[:, :c].float()
            x0_t = self.diffusion.predict_x0(x_start, t_start, eps_t)
            x_prev = self.diffusion.q_sample(x0_t, t_prev, eps_t)
            tgt = self.consistency_fn(target(x_prev, cond, t_prev, w)[:, :c].float(), x_prev, t_prev)
        pred = self.consistency_fn(student(x_start, cond, t_start, w)[:, :c].float(), x_start, t_start)
        diff = (pred - tgt.float()).flatten(1)
        if self.huber_c is None:
            dist = (diff**2).mean(dim=1)
        else:  # pseudo-Huber over each sample's elements, as the LCM scripts compute it (element-wise)
            dist = ((diff**2 + self.huber_c**2).sqrt() - self.huber_c).mean(dim=1)
        return DistillLoss(loss=dist.mean(), distance=dist.detach())
