"""The ranges of every numeric sampling setting, checked in one place before any model loads.

Each bound follows from the model or the sampler where it can: steps at most the noise schedule's length (1000
training timesteps), less where a solver documents or shows less. Measured with diffusers' schedulers on the
PixCell schedule (1000 linear betas): DPM-Solver++ (ODE and SDE) and SA-Solver give NaN latents, hence black
images, at 1000 steps and are finite at 999 (their last step divides by a zero-length log-SNR interval); DDIM and
ancestral DDPM refuse more than 1000 themselves; Euler ancestral accepts more but repeats timesteps; LCM takes at
most its `original_inference_steps` (50). A step count beyond these used to exit 0 with black images, or, far
beyond (1e8 steps), to allocate tens of GB for the timestep table before the kernel killed the job.

Guidance has no bound from the model; past ~100 the guided noise prediction swamps the latents (1e30 made
every image black), so a larger scale is refused as a likely typo. Whatever slips through is caught on the
output (`diffusion.sampling.checks`).

Messages name each setting by its library parameter in backquotes (`num_inference_steps`); the command-line
tools show their flag instead (tools.cli.check_numeric_args).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

NUM_TRAIN_TIMESTEPS = 1000
# Most steps each sampler can take on the 1000-step schedule (see the module docstring).
MAX_STEPS = {
    "dpm-solver": NUM_TRAIN_TIMESTEPS - 1,
    "sde-dpm-solver": NUM_TRAIN_TIMESTEPS - 1,
    "sa-solver": NUM_TRAIN_TIMESTEPS - 1,
    "ddim": NUM_TRAIN_TIMESTEPS,
    "ddpm": NUM_TRAIN_TIMESTEPS,
    "euler-ancestral": NUM_TRAIN_TIMESTEPS,
    "lcm": 50,  # LCMScheduler's original_inference_steps (samplers.py)
}
MAX_GUIDANCE = 100.0

# parameter: (lowest, highest, whole number); None: unbounded on that side. Steps and guidance have their own
# checks below (their bounds depend on the sampler, and a negative guidance needs its flag).
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "batch_size": (1, None, True),  # images per forward
    "vae_batch": (1, None, True),  # images (windows) per VAE decode call
    "window_batch": (1, None, True),
    "workers": (0, None, True),
    "max_skips": (0, None, True),
    "jpeg_quality": (1, 100, True),
    "n_images": (1, None, True),
    "prior_steps": (1, None, True),
    "stride": (1, None, True),
    "decode_stride": (1, None, True),
    "sigma": (1e-6, None, False),
    "lora_scale": (None, None, False),  # finite
    "controlnet_scale": (None, None, False),
    "prior_guidance": (-MAX_GUIDANCE, MAX_GUIDANCE, False),
}


def check_steps(steps: object, sampler: str | None = None) -> None:
    """`num_inference_steps`: a whole number >= 1 and at most what `sampler` can take (None: any sampler's)."""
    if (
        isinstance(steps, bool)
        or not isinstance(steps, numbers.Real)
        or not float(steps).is_integer()
        or steps < 1
    ):
        raise ValueError(f"`num_inference_steps` {steps}: expected a whole number >= 1")
    most = MAX_STEPS.get(sampler, max(MAX_STEPS.values())) if sampler else max(MAX_STEPS.values())
    if steps > most:
        which = f"{sampler} takes" if sampler else "the samplers take"
        raise ValueError(
            f"`num_inference_steps` {int(steps)}: {which} at most {most} steps on the {NUM_TRAIN_TIMESTEPS}-step "
            "noise schedule (more gives NaN latents, black images)"
        )


def check_guidance(w: float, allow_negative: bool = False) -> None:
    """`guidance_scale`: finite, at most MAX_GUIDANCE in size, and negative only when meant."""
    if not math.isfinite(w):
        raise ValueError(f"`guidance_scale` {w}: expected a finite number (1 = conditional only)")
    if w < 0 and not allow_negative:
        raise ValueError(
            f"`guidance_scale` {w:g}: a negative scale pushes samples away from their condition; pass "
            "`allow_negative_guidance` if that is meant"
        )
    if abs(w) > MAX_GUIDANCE:
        raise ValueError(
            f"`guidance_scale` {w:g}: expected at most {MAX_GUIDANCE:g} in size (published: 2.0 at 256 px, 1.2 at "
            "1024; far larger scales swamp the latents and give black images)"
        )


def check_value(name: str, value: object) -> None:
    """One setting of RANGES: a number (whole where it must be) within its bounds."""
    low, high, whole = RANGES[name]
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or (whole and not float(value).is_integer()):
        raise ValueError(f"`{name}` {value}: expected a {'whole' if whole else 'finite'} number")
    if low is not None and value < low:
        raise ValueError(f"`{name}` {value}: expected >= {low:g}")
    if high is not None and value > high:
        raise ValueError(f"`{name}` {value}: expected <= {high:g}")


def check_limits(
    values: Mapping[str, object],  # parameter name -> value; None: unset (its default applies later)
    sampler: str | None = None,  # None: not chosen yet (the model's recorded one): any sampler's bound
    allow_negative_guidance: bool = False,
) -> None:
    """Every numeric setting in `values` within its range: one ValueError naming the first that is not."""
    for name, value in values.items():
        if value is None:
            continue
        if name == "num_inference_steps":
            check_steps(value, sampler)
        elif name == "guidance_scale":
            check_guidance(float(value), allow_negative_guidance)
        else:
            check_value(name, value)
