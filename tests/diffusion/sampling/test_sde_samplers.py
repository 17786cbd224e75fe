"""The SDE samplers (SDE-DPM-Solver++, ancestral Euler): fresh noise at every step exactly as the schedulers
document it, per-image generators (same seed, same image, whatever the batch), and both sampling tools."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.command import run_cli
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.runner import initial_noise
from diffusion.sampling.samplers import denoise, make_scheduler, sampler_name
from diffusion.standins import random_pixcell

SDE = ["sde-dpm-solver", "euler-ancestral"]
MODULE = {
    "sde-dpm-solver": "diffusers.schedulers.scheduling_dpmsolver_multistep",
    "euler-ancestral": "diffusers.schedulers.scheduling_euler_ancestral_discrete",
}
C = 96


def noise_scale(scheduler, name: str, k: int) -> float:
    """The documented std of the noise added by step k.

    SDE-DPM-Solver++ (first order; its 2M update adds the same term): sigma_t sqrt(1 - e^(-2h)), h = lambda_t -
    lambda_s, lambda = log(alpha / sigma) (Lu et al. 2022, DPM-Solver++ Sec. 5). Ancestral Euler: sigma_up =
    sqrt(s_next^2 (s^2 - s_next^2) / s^2) (k-diffusion `get_ancestral_step`, eta 1). Both are 0 at the last step,
    which ends at sigma = 0.
    """
    s, s_next = float(scheduler.sigmas[k]), float(scheduler.sigmas[k + 1])
    if s_next == 0:
        return 0.0
    if name == "euler-ancestral":
        return math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
    # DPM-Solver's sigmas are sqrt((1 - abar) / abar): alpha = 1 / sqrt(1 + s^2), sigma = s alpha.
    a, a_next = 1 / math.sqrt(1 + s**2), 1 / math.sqrt(1 + s_next**2)
    h = math.log(a_next / (s_next * a_next)) - math.log(a / (s * a))
    return s_next * a_next * math.sqrt(1 - math.exp(-2 * h))


@pytest.mark.parametrize("name", SDE)
def test_noise_enters_at_every_step_as_documented(name, monkeypatch):
    """Run twice with the same generator; the second time the noise of step k is zeroed. Step k's output then
    differs by exactly noise_scale(k) * z_k, for every k: noise enters at every step (not only at the start)."""
    module = importlib.import_module(MODULE[name])
    real_randn = module.randn_tensor
    steps, shape = 5, (2, 16, 4, 4)

    def eps_fn(x, t):  # any smooth model; the noise term does not depend on it
        return 0.3 * x + 0.01 * float(t) / 1000

    def run(zero_at: int | None):
        draws: list[torch.Tensor] = []

        def randn(*args, **kwargs):
            z = real_randn(*args, **kwargs)
            draws.append(z)
            return torch.zeros_like(z) if len(draws) - 1 == zero_at else z

        monkeypatch.setattr(module, "randn_tensor", randn)
        scheduler = make_scheduler(name)
        step, outputs = scheduler.step, []

        def recording_step(*args, **kwargs):
            out = step(*args, **kwargs)
            outputs.append(out[0].clone())
            return out

        scheduler.step = recording_step
        g = torch.Generator().manual_seed(0)
        x = denoise(eps_fn, torch.randn(shape, generator=torch.Generator().manual_seed(1)), scheduler, steps,
                    generator=g, progress=False)  # fmt: skip
        return x, draws, outputs, scheduler

    final, draws, outputs, scheduler = run(None)
    assert len(draws) == steps  # one draw per step from the caller's generator
    for k in range(steps):
        _, _, zeroed, _ = run(k)
        for j in range(k):
            assert torch.equal(zeroed[j], outputs[j])  # earlier steps untouched
        scale = noise_scale(scheduler, name, k)
        torch.testing.assert_close(outputs[k] - zeroed[k], scale * draws[k], rtol=1e-4, atol=1e-5)
        assert (scale > 0.01) == (k < steps - 1), (k, scale)  # every step but the last (it ends at sigma 0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sde_model")
    random_pixcell("PixCell-tiny-64", scale=0.02, caption_channels=C).save_pretrained(out)
    return out


@pytest.mark.parametrize("name", SDE)
def test_pipeline_same_seed_same_image_whatever_the_batch(name, model_dir, tiny_vae_dir):
    pipe = PixCellPipeline.from_parts(model_dir, tiny_vae_dir, name)
    assert sampler_name(pipe.scheduler) == name
    cond = torch.randn(2, 1, C, generator=torch.Generator().manual_seed(1))
    kw = dict(guidance_scale=2.0, num_inference_steps=4, output_type="latent", progress=False)
    noise, gens = initial_noise([11, 12], (16, 8, 8))
    both = pipe(cond, latents=noise, generator=gens, **kw).images
    noise, gens = initial_noise([11, 12], (16, 8, 8))
    again = pipe(cond, latents=noise, generator=gens, **kw).images
    assert torch.equal(both, again)
    noise, gens = initial_noise([12], (16, 8, 8))
    alone = pipe(cond[1:], latents=noise, generator=gens, **kw).images
    torch.testing.assert_close(both[1], alone[0], rtol=1e-4, atol=1e-5)
    _, other = initial_noise([13], (16, 8, 8))  # same start, another generator: the SDE noise differs
    assert not torch.allclose(alone, pipe(cond[1:], latents=noise, generator=other, **kw).images, atol=1e-3)


def test_saved_pipeline_keeps_the_sde_sampler(model_dir, tiny_vae_dir, tmp_path):
    """DPM-Solver++ and SDE-DPM-Solver++ share a scheduler class; the saved config tells them apart."""
    PixCellPipeline.from_parts(model_dir, tiny_vae_dir, "sde-dpm-solver").save_pretrained(tmp_path / "p")
    assert sampler_name(PixCellPipeline.from_pretrained(tmp_path / "p").scheduler) == "sde-dpm-solver"


@pytest.mark.parametrize("name", SDE)
def test_both_tools_are_deterministic_with_sde_samplers(name, model_dir, tiny_vae_dir, tmp_path):
    from tools.sample import main as sample
    from tools.sample_4k import main as sample_4k

    np.save(tmp_path / "e.npy", np.random.default_rng(0).standard_normal((3, 1, C)).astype(np.float32))
    np.save(tmp_path / "g.npy", np.random.default_rng(1).standard_normal((2, 2, C)).astype(np.float32))
    common = ["--model", str(model_dir), "--vae", str(tiny_vae_dir), "--sampler", name, "--steps", "3",
              "--device", "cpu", "--no-progress"]  # fmt: skip
    images = {}
    for run in ("a", "b"):
        assert (
            run_cli(sample, [*common, "--embeddings", str(tmp_path / "e.npy"), "--out", str(tmp_path / run)])
            == 0
        )
        out4k = str(tmp_path / f"4k{run}")
        assert (
            run_cli(sample_4k, [*common, "--grid", str(tmp_path / "g.npy"), "--stride", "8", "--out", out4k])
            == 0
        )
        images[run] = [np.asarray(Image.open(tmp_path / run / "syn" / f"e_00000{i}.png")) for i in range(3)]
        images[run].append(np.asarray(Image.open(tmp_path / f"4k{run}" / "syn" / "g.png")))
        assert json.loads((tmp_path / run / "run.json").read_text())["sampler"] == name
    assert all(np.array_equal(a, b) for a, b in zip(images["a"], images["b"]))
    assert not np.array_equal(images["a"][0], images["a"][1])
