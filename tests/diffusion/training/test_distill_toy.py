"""Latent consistency distillation on a problem with a known answer: a 2-D Gaussian mixture as the "latents".

Eight modes on the unit circle (std 0.05); the condition picks the even or the odd modes. A tiny teacher is
trained to it here (eps MSE, 10% null condition), then distilled with `ConsistencyDistiller` into a student that
takes the guidance scale as an input. At w = 2 the reference is the teacher's own distribution (50 DPM-Solver++
steps). Stated tolerance, measured over seeds on this machine (FD of the 4-step student ~0.02-0.03, plain 4-step
DPM-Solver++ ~0.2-0.3 with no mode resolved): the 4-step LCM student is within FD 0.1 of the reference and
resolves all 8 modes; 4-step DPM-Solver++ of the teacher is at least 3x further away and resolves fewer.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.metrics.distances import frechet_distance_from_features
from diffusion.sampling.samplers import denoise, guided_prediction, make_scheduler
from diffusion.training.distill import ConsistencyDistiller, boundary_coefficients
from diffusion.training.ema import EMA

K, STD = 8, 0.05
CENTERS = torch.tensor([[math.cos(2 * math.pi * k / K), math.sin(2 * math.pi * k / K)] for k in range(K)])
NULL = torch.zeros(1, 1, 2)  # the toy's null condition
W = 2.0


def mixture(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2) samples and their (n, 1, 2) one-hot condition (class 0: even modes, 1: odd modes)."""
    cls = torch.randint(0, 2, (n,), generator=g)
    mode = 2 * torch.randint(0, K // 2, (n,), generator=g) + cls
    return CENTERS[mode] + STD * torch.randn(n, 2, generator=g), nn.functional.one_hot(cls, 2).float()[
        :, None
    ]


def sincos(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2))
    a = t.float()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], 1)


class ToyDenoiser(nn.Module):
    """eps(x, cond, t[, w]) for 2-D points; with `guidance` an embedding of w (zero-initialised, like PixCell's)."""

    def __init__(self, guidance: bool = False, hidden: int = 128):
        super().__init__()
        self.inp, self.cond = nn.Linear(2, hidden), nn.Linear(2, hidden)
        self.time = nn.Sequential(nn.Linear(32, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 2))  # fmt: skip
        self.guidance = None
        if guidance:
            self.guidance = nn.Sequential(nn.Linear(32, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            nn.init.zeros_(self.guidance[2].weight)
            nn.init.zeros_(self.guidance[2].bias)

    def forward(self, x, cond, t, w=None):
        h = self.inp(x) + self.time(sincos(t)) + self.cond(cond[:, 0])
        if self.guidance is not None:
            h = h + self.guidance(sincos(w * 1000))
        return self.net(h)


def metrics(x: torch.Tensor, cond: torch.Tensor, ref: torch.Tensor) -> dict:
    """FD to the reference samples; modes resolved (holding > 2% of the samples within 4 std)."""
    d = torch.cdist(x, CENTERS)
    near, dist = d.argmin(1), d.min(1).values
    close = dist < 4 * STD
    right = near % 2 == cond[:, 0].argmax(1)
    counts = torch.bincount(near[close], minlength=K)
    return {
        "fd": frechet_distance_from_features(x.numpy(), ref.numpy()),
        "modes": int((counts > 0.02 * len(x)).sum()),
        "precision": float((close & right).float().mean()),
    }


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    diffusion = GaussianDiffusion()
    teacher = ToyDenoiser()
    opt = torch.optim.Adam(teacher.parameters(), 2e-3)
    for _ in range(1500):
        x0, c = mixture(256, g)
        c = torch.where((torch.rand(256, generator=g) < 0.1)[:, None, None], NULL, c)
        t = diffusion.sample_timesteps(256, "cpu", g)
        noise = torch.randn(x0.shape, generator=g)
        loss = ((teacher(diffusion.q_sample(x0, t, noise), c, t) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval().requires_grad_(False)

    # Distil: student = teacher + zero guidance embedding; target = EMA of the student (rate 0.95, LCM's).
    student = ToyDenoiser(guidance=True)
    student.load_state_dict(teacher.state_dict(), strict=False)
    target = copy.deepcopy(student).requires_grad_(False)
    ema = EMA(student, 0.95)
    distiller = ConsistencyDistiller(guidance_range=(1.0, 3.0))
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    for _ in range(800):
        x0, c = mixture(256, g)
        out = distiller.loss(student, target, teacher, x0, c, NULL.expand(256, -1, -1), g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        ema.update(student)
        ema.copy_to(target)
    yield teacher, target
    torch.set_num_threads(threads)


def run(eps_fn, sampler: str, steps: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cond = nn.functional.one_hot(torch.arange(n) % 2, 2).float()[:, None]
    x = torch.randn(n, 2, generator=g)
    with torch.no_grad():
        return denoise(lambda x, t: eps_fn(x, cond, t), x, make_scheduler(sampler), steps, generator=g,
                       progress=False), cond  # fmt: skip


def test_four_step_student_matches_the_teacher_where_dpm_solver_does_not(trained):
    teacher, student = trained
    n = 2000

    def guided(x, cond, t):
        return guided_prediction(teacher, x, t, cond, NULL.expand(len(x), -1, -1), W)

    def distilled(x, cond, t):
        return student(x, cond, t.reshape(-1).expand(len(x)), torch.full((len(x),), W))

    ref, _ = run(guided, "dpm-solver", 50, n, seed=7)
    m_student = metrics(*run(distilled, "lcm", 4, n, seed=1), ref)
    m_dpm4 = metrics(*run(guided, "dpm-solver", 4, n, seed=1), ref)
    m_dpm20 = metrics(*run(guided, "dpm-solver", 20, n, seed=1), ref)
    assert m_dpm20["fd"] < 0.02 and m_dpm20["modes"] == K  # the reference is the teacher's converged output
    assert m_student["fd"] < 0.1, m_student
    assert m_student["modes"] == K and m_student["precision"] > 0.3, m_student
    assert m_dpm4["fd"] > 3 * m_student["fd"], (m_dpm4, m_student)
    assert m_dpm4["modes"] < K, m_dpm4


def test_consistency_function_is_the_identity_at_time_zero():
    c_skip, c_out = boundary_coefficients(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x: LCM's boundary condition
    assert c_skip[2] < 1e-6 and abs(float(c_out[2]) - 1) < 1e-6  # far from 0: the model's x0 estimate


def test_distiller_draws_lcm_scheduler_timesteps():
    """The training pairs sit on the timesteps the student is later sampled at (LCMScheduler, 50 origin steps)."""
    t_start, t_prev, w = ConsistencyDistiller((1.5, 2.5)).sample_inputs(
        4096, "cpu", torch.Generator().manual_seed(0)
    )
    scheduler = make_scheduler("lcm")
    scheduler.set_timesteps(50)
    assert set(t_start.tolist()) == set(scheduler.timesteps.tolist())
    assert torch.equal(t_prev, (t_start - 20).clamp(min=0))
    assert 1.5 <= float(w.min()) and float(w.max()) <= 2.5
