"""Samplers end to end through PixCellPipeline, guidance in one place, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.samplers import (
    SAMPLERS,
    guided_prediction,
    make_scheduler,
    sampler_name,
    transformer_fn,
)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_vae_dir, tmp_path_factory):
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-64").eval()
    for p in model.parameters():  # non-zero output head, so guidance and samplers have something to act on
        p.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("tiny_transformer")
    model.save_pretrained(folder)
    return PixCellPipeline.from_parts(folder, tiny_vae_dir)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_sampler_runs_end_to_end(tiny_pipe, sampler):
    tiny_pipe.set_sampler(sampler)
    assert sampler_name(tiny_pipe.scheduler) == sampler
    out = tiny_pipe(
        torch.randn(2, 1, 1536), num_inference_steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert len(out.images) == 2 and out.images[0].size == (64, 64)
    arr = np.asarray(out.images[0])
    assert arr.dtype == np.uint8 and arr.shape == (64, 64, 3)
    tiny_pipe.set_sampler("dpm-solver")


def test_output_types_and_exact_seeding(tiny_pipe):
    uni = torch.randn(1, 1, 1536)
    latents = torch.randn(1, 16, 8, 8)
    a = tiny_pipe(uni, num_inference_steps=3, latents=latents, output_type="latent").images
    b = tiny_pipe(uni, num_inference_steps=3, latents=latents.clone(), output_type="latent").images
    assert a.shape == (1, 16, 8, 8) and torch.equal(a, b)
    pt = tiny_pipe(uni, num_inference_steps=3, latents=latents, output_type="pt").images
    assert pt.shape == (1, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    np_img = tiny_pipe(uni, num_inference_steps=3, latents=latents, output_type="np").images
    assert np.allclose(np_img[0], pt[0].permute(1, 2, 0).numpy())


def test_guidance_scale_one_is_the_conditional_prediction(tiny_pipe):
    fn = transformer_fn(tiny_pipe.transformer)
    x, t = torch.randn(2, 16, 8, 8), torch.tensor(500)
    cond, uncond = torch.randn(2, 1, 1536), tiny_pipe.transformer.null_condition(2)
    with torch.no_grad():
        plain = fn(x, cond, t.expand(2))
        assert torch.equal(guided_prediction(fn, x, t, cond, uncond, 1.0), plain)
        w = 3.0
        guided = guided_prediction(fn, x, t, cond, uncond, w)
        unc = fn(x, uncond, t.expand(2))
    assert torch.allclose(guided[:, :16], unc[:, :16] + w * (plain[:, :16] - unc[:, :16]), atol=1e-5)
    assert torch.allclose(guided[:, 16:], plain[:, 16:], atol=1e-6)  # variance: the conditional one
    # Outside the guidance interval: the conditional prediction.
    assert torch.equal(guided_prediction(fn, x, t, cond, uncond, w, interval=(0, 100)), plain)


def test_bad_inputs_are_one_line_errors(tiny_pipe):
    with pytest.raises(ValueError, match=r"expected shape \(batch, 1, 1536\)"):
        tiny_pipe(torch.randn(1, 16, 1536), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"got \(1, 1, 768\)"):
        tiny_pipe(torch.randn(1, 1, 768), num_inference_steps=2)
    nan = torch.randn(1, 1, 1536)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tiny_pipe(nan, num_inference_steps=2)
    with pytest.raises(ValueError, match="latents: expected shape"):
        tiny_pipe(torch.randn(1, 1, 1536), latents=torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("euler")


def test_pipeline_folder_roundtrip(tiny_pipe, tmp_path):
    tiny_pipe.set_sampler("ddim")
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    tiny_pipe.set_sampler("dpm-solver")
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    loaded = PixCellPipeline.from_pretrained(tmp_path / "pipe")
    assert sampler_name(loaded.scheduler) == "ddim"  # the saved scheduler is kept
    uni, latents = torch.randn(1, 1, 1536), torch.randn(1, 16, 8, 8)
    tiny_pipe.set_sampler("ddim")
    a = tiny_pipe(uni, num_inference_steps=3, latents=latents, output_type="pt").images
    b = loaded(uni, num_inference_steps=3, latents=latents, output_type="pt").images
    tiny_pipe.set_sampler("dpm-solver")
    assert torch.allclose(a, b, atol=1e-6)


def test_t16_model_makes_four_times_larger_images(tiny_vae_dir):
    model = build_pixcell("PixCell-tiny-128-T16").eval()
    pipe = PixCellPipeline.from_parts(model, tiny_vae_dir)
    assert pipe.image_size == 128
    out = pipe(torch.randn(1, 16, 1536), num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 128, 128)
