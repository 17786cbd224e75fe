"""Samplers (diffusers schedulers) and classifier-free guidance, in one place.

Guidance convention, used everywhere in this codebase: eps = eps_u + w (eps_c - eps_u) on all 16 noise channels
(w = 1: the conditional prediction; w = 0: unconditional). The unconditional input is the model's fixed null
condition, fed through the same path as a real condition. (The original `forward_with_cfg` guided only 3 channels,
and its 4K script used (w+1) eps_c - w eps_u; neither is reproduced.)

Schedulers are diffusers' own. DPM-Solver++ (2M, 20 steps, `linspace` spacing, lower-order final step) is the
default and reproduces the original PixCell DPM-Solver to ~1e-3 relative on the final latent; with `leading`
spacing it would not. Trap: DPM-Solver and SA-Solver slice a learned variance as [:, :3], which is wrong for
16-channel latents, so they get the 16 eps channels only; the ancestral DDPM sampler gets eps + variance.

SDE samplers (fresh noise enters at every step, drawn from the generator(s) the caller passes, so a seeded or
resumed run repeats itself exactly): `sde-dpm-solver` is SDE-DPM-Solver++ (Lu et al. 2022, "DPM-Solver++",
Sec. 5 / Eq. of the first-order update x_t = (s_t/s_s) e^-h x_s + a_t (1 - e^-2h) x0 + s_t sqrt(1 - e^-2h) z),
and `euler-ancestral` the ancestral Euler discretisation of the reverse SDE (Karras et al. 2022, Alg. 2 with
S_churn as in k-diffusion's `sample_euler_ancestral`: an Euler step to sigma_down, then noise of std sigma_up,
sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2), which CytoSyn found better than ODE sampling at low
step counts. `lcm` is the few-step sampler of a distilled student (diffusers' LCMScheduler, Luo et al. 2023): a
student has the guidance scale as an input (`guidance_embeds` in its config), so it runs without the
unconditional pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    SASolverScheduler,
    SchedulerMixin,
)
from torch import Tensor
from tqdm.auto import tqdm

from .limits import check_guidance, check_steps

if TYPE_CHECKING:
    from ..model.pixcell_transformer import PixCellTransformer2DModel

_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _dpm_solver(algorithm_type: str) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M), as an ODE (`dpmsolver++`) or an SDE (`sde-dpmsolver++`) solver."""
    return DPMSolverMultistepScheduler(
        **_SCHEDULE,
        algorithm_type=algorithm_type,
        solver_order=2,
        prediction_type="epsilon",
        timestep_spacing="linspace",
        lower_order_final=True,
    )


SAMPLERS: dict[str, Callable[[], object]] = {
    "dpm-solver": lambda: _dpm_solver("dpmsolver++"),
    "ddim": lambda: DDIMScheduler(
        **_SCHEDULE,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="linspace",
    ),
    "sa-solver": lambda: SASolverScheduler(
        **_SCHEDULE,
        prediction_type="epsilon",
        predictor_order=2,
        corrector_order=2,
        timestep_spacing="linspace",
    ),
    # Ancestral sampling with the learned variance (iDDPM), so it receives all 32 output channels.
    "ddpm": lambda: DDPMScheduler(
        **_SCHEDULE,
        prediction_type="epsilon",
        variance_type="learned_range",
        clip_sample=False,
        timestep_spacing="linspace",
    ),
    # SDE-DPM-Solver++ (2M): the same solver with a noise term at every step (algorithm_type decides).
    "sde-dpm-solver": lambda: _dpm_solver("sde-dpmsolver++"),
    "euler-ancestral": lambda: EulerAncestralDiscreteScheduler(
        **_SCHEDULE,
        prediction_type="epsilon",
        timestep_spacing="linspace",
    ),
    # The distilled student's sampler. original_inference_steps=50 gives the skipping-step timesteps
    # 19, 39, ..., 999 that the distillation trains on (diffusion/training/distill.py: SKIP_STEP).
    "lcm": lambda: LCMScheduler(
        **_SCHEDULE,
        prediction_type="epsilon",
        original_inference_steps=50,
        timestep_scaling=10.0,
        clip_sample=False,
        set_alpha_to_one=True,
    ),
}
DEFAULT_STEPS = {
    "dpm-solver": 20,
    "ddim": 50,
    "sa-solver": 25,
    "ddpm": 100,
    "sde-dpm-solver": 20,
    "euler-ancestral": 30,
    "lcm": 4,
}
# Config entries that tell apart samplers sharing one scheduler class (DPM-Solver++ and its SDE form).
_SIGNATURE = {
    "dpm-solver": {"algorithm_type": "dpmsolver++"},
    "sde-dpm-solver": {"algorithm_type": "sde-dpmsolver++"},
}
# Published FID-optimal guidance (PixCell paper): 2.0 for PixCell-256 (T=1), 1.2 for PixCell-1024 (T=16).
DEFAULT_GUIDANCE = {1: 2.0, 4: 1.5, 16: 1.2}


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample, resolved: every field set (recorded in run.json and each manifest row). Built once per
    request by `resolve_sampling`, then taken as it is by the runner, the pipeline and the app."""

    sampler: str  # a key of SAMPLERS
    steps: int  # >= 1
    guidance: float  # w in eps_u + w (eps_c - eps_u); finite
    guidance_interval: tuple[float, float] | None = None  # guide only for timesteps in [low, high]
    allow_negative_guidance: bool = False  # a negative guidance is an error unless this says it is meant


def resolve_sampling(
    sampler: str,
    steps: int | None,
    guidance: float | None,
    tokens: int,
    recorded: Mapping[str, object] | None = None,
    guidance_interval: tuple[float, float] | Sequence[float] | None = None,
    allow_negative_guidance: bool = False,
) -> SamplingOptions:
    """THE one place where sampling defaults are filled in and checked. Unset values come from, in order: what
    is `recorded` beside the weights (a distilled student's sampling.json: its guidance, and its steps when
    recorded for this sampler), then DEFAULT_STEPS of the sampler and the published guidance for a model taking
    `tokens` UNI tokens (1.5 for token counts without a published value).

    Every sampling path resolves its settings here, so one check covers them all: a NaN guidance used to give
    all-black images and exit 0. A negative scale (pushing away from the condition) is an error unless
    `allow_negative_guidance` says it is meant."""
    if sampler not in DEFAULT_STEPS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(DEFAULT_STEPS)}")
    recorded = recorded or {}
    if guidance is None:
        guidance = recorded.get("guidance")
    if steps is None and recorded.get("sampler") == sampler:
        steps = recorded.get("steps")
    if steps is not None:
        check_steps(steps, sampler)  # at most what the sampler takes on the schedule (limits.MAX_STEPS)
    w = DEFAULT_GUIDANCE.get(tokens, 1.5) if guidance is None else float(guidance)
    check_guidance(w, allow_negative_guidance)
    interval = None
    if guidance_interval is not None:
        low, high = (float(v) for v in guidance_interval)
        interval = (low, high)
    return SamplingOptions(
        sampler, int(steps or DEFAULT_STEPS[sampler]), w, interval, allow_negative_guidance
    )


def guides(guidance_scale: float) -> bool:
    """Whether guidance needs the unconditional pass: with w == 1, eps_u + w (eps_c - eps_u) is exactly eps_c."""
    return guidance_scale != 1.0


def make_scheduler(name: str = "dpm-solver") -> SchedulerMixin:
    """A fresh diffusers scheduler for the PixCell noise schedule (1000 linear betas 1e-4..0.02)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]()


def sampler_name(scheduler: SchedulerMixin | str, config: dict | None = None) -> str:
    """The SAMPLERS key of a scheduler instance, or of a class name with its saved `config` (scheduler_config.json).

    A class name alone stands for its first sampler (DPMSolverMultistepScheduler: `dpm-solver`)."""
    if isinstance(scheduler, str):
        cls_name = scheduler
    else:
        cls_name, config = type(scheduler).__name__, dict(scheduler.config)
    for name, make in SAMPLERS.items():
        if type(make()).__name__ != cls_name:
            continue
        if config is None or all(config.get(k, v) == v for k, v in _SIGNATURE.get(name, {}).items()):
            return name
    raise ValueError(f"unsupported scheduler {cls_name!r}; PixCell samples with {', '.join(SAMPLERS)}")


def wants_variance(scheduler: SchedulerMixin) -> bool:
    """True when the scheduler consumes the learned variance channels (ancestral DDPM)."""
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


def guidance_active(t: Tensor | float, interval: tuple[float, float] | None) -> bool:
    """Guidance interval (CytoSyn / Kynkaanniemi et al. 2024): guide only for timesteps t in [low, high]."""
    if interval is None:
        return True
    low, high = interval
    return low <= float(t) <= high


def guided_prediction(
    model: Callable[..., Tensor],
    x: Tensor,  # (B, C, h, w) latents at timestep t
    t: Tensor,  # scalar timestep, or (B,) per-row timesteps (distillation)
    cond: Tensor,  # (B, T, C_uni) conditions
    uncond: Tensor | None,  # (B, T, C_uni) null conditions, or None for no guidance
    guidance_scale: float | Tensor,  # w, or (B,) per-row scales (distillation)
    interval: tuple[float, float] | None = None,
) -> Tensor:
    """THE classifier-free guidance: (B, 2C, h, w) = [eps_u + w (eps_c - eps_u), conditional variance].

    Conditional and unconditional passes share one batched forward. With w == 1, no guidance, or t outside
    the guidance interval, only the conditional pass runs (exactly the conditional prediction).
    """
    c = x.shape[1]
    tt = t.reshape(-1).expand(x.shape[0]).to(x.device)
    w = guidance_scale
    if uncond is None or (not torch.is_tensor(w) and not guides(w)) or not guidance_active(t, interval):
        return model(x, cond, tt)
    out = model(torch.cat([x, x]), torch.cat([cond, uncond]), torch.cat([tt, tt]))
    out_c, out_u = out.chunk(2)
    if torch.is_tensor(w):
        w = w.to(out_c).view(-1, *([1] * (x.ndim - 1)))
    eps = out_u[:, :c] + w * (out_c[:, :c] - out_u[:, :c])
    return torch.cat([eps, out_c[:, c:]], dim=1)


def guidance_in_model(transformer: PixCellTransformer2DModel) -> bool:
    """True for a distilled student: the guidance scale is one of its inputs (no unconditional pass)."""
    return bool(getattr(transformer.config, "guidance_embeds", False))


def transformer_fn(
    transformer: PixCellTransformer2DModel, guidance_scale: float | None = None
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Adapt a PixCell transformer to the (x, cond, t) -> output callable the samplers take.

    A student (`guidance_in_model`) gets `guidance_scale` as its guidance input on every call; the caller then
    passes no unconditional condition to `guided_prediction`, so it runs the one (guided) pass.
    """
    dtype = next(transformer.parameters()).dtype
    student = guidance_in_model(transformer)
    if student and guidance_scale is None:
        raise ValueError("this model takes the guidance scale as an input: pass guidance_scale")

    def fn(x: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        kw = (
            {"guidance": torch.full((x.shape[0],), float(guidance_scale), device=x.device)} if student else {}
        )
        out = transformer(
            x.to(dtype), encoder_hidden_states=cond.to(dtype), timestep=t, return_dict=False, **kw
        )
        return out[0].float()

    return fn


def denoise(
    eps_fn: Callable[[Tensor, Tensor], Tensor],
    latents: Tensor,
    scheduler: SchedulerMixin,
    num_inference_steps: int = 20,
    generator: torch.Generator | list[torch.Generator] | None = None,  # a list: one per row (per-image seeds)
    progress: bool = True,
    on_step: Callable[[int, Tensor, Tensor], Tensor | None] | None = None,  # (i, t, x) after step i
    start: int = 0,  # img2img (SDEdit): run steps start.. only, from `latents` already noised to that step
) -> Tensor:
    """Run a diffusers scheduler from noise `latents` (B, C, h, w) with `eps_fn(x, t) -> (B, 2C, h, w)`.

    eps_fn is usually `lambda x, t: guided_prediction(...)`; the 4K tool passes a sliding-window version.
    `on_step` sees the latents after each step and may return replacements (the pipelines' callbacks).
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    if start and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    x = latents * scheduler.init_noise_sigma if start == 0 else latents
    c = x.shape[1]
    full = wants_variance(scheduler)
    steps = scheduler.timesteps[start:]
    for i, t in enumerate(tqdm(steps, desc="denoising", disable=not progress, leave=False), start):
        x_in = scheduler.scale_model_input(x, t)
        out = eps_fn(x_in, t)
        out = out if full else out[:, :c]
        x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
        if on_step is not None:
            replaced = on_step(i, t, x)
            x = x if replaced is None else replaced
    return x
