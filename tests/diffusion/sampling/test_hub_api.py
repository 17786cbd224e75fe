"""The Hub pipelines' call patterns (the README's "Coming from the Hub pipeline"; `../shared/formats/hub_api.md`)
run unchanged against our pipelines and give the images of our native call; published-layout snapshots load
without executing their Python files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

from diffusion.model.controlnet import PixCellControlNet
from diffusion.sampling.controlnet_pipeline import PixCellControlNetPipeline
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.samplers import sampler_name
from diffusion.standins import random_pixcell

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models


@pytest.fixture(scope="module")
def pipeline(tiny_vae_dir):
    """A 256 px model (1 UNI token), so the Hub call's height=256, width=256 apply as written."""
    return PixCellPipeline.from_parts(random_pixcell("PixCell-tiny-256"), tiny_vae_dir)


def test_hub_call_pattern_verbatim_gives_the_native_images(pipeline):
    uni_emb = torch.randn(2, 1, 1536)
    generator = torch.Generator().manual_seed(0)
    # ---- the call as the Hub pipeline's users write it (hub_api.md), unchanged
    uncond = pipeline.get_unconditional_embedding(uni_emb.shape[0])  # (B, T, 1536): the null condition
    images = pipeline(
        uni_embeds=uni_emb,  # (B, 1, 1536) at 256 px; (B, 16, 1536) at 1024 px, row-major 4x4 tiles
        negative_uni_embeds=uncond,
        guidance_scale=1.5,  # callers use 1.5-3; the pipeline's own default is unknown
        num_inference_steps=20,
        num_images_per_prompt=1,
        generator=generator,
        latents=None,
        callback=None,
        callback_steps=1,  # legacy PixArt-Sigma callback arguments
        height=256,
        width=256,  # 1024 for PixCell-1024
    ).images
    # ---- our native call, same seed: the null condition is filled in by default
    native = pipeline(uni_emb, guidance_scale=1.5, generator=torch.Generator().manual_seed(0)).images
    assert uncond.shape == (2, 1, 1536)
    assert torch.equal(uncond[0], pipeline.transformer.caption_projection.uncond_embedding)
    assert len(images) == 2 and images[0].size == (256, 256)
    for a, b in zip(images, native):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_num_images_per_prompt_gives_k_distinct_images_per_condition(pipeline):
    uni = torch.randn(2, 1, 1536)
    kw = dict(num_inference_steps=3, output_type="latent", progress=False)
    out = pipeline(uni, num_images_per_prompt=3, generator=torch.Generator().manual_seed(1), **kw).images
    assert out.shape == (6, 16, 32, 32)
    for i in range(6):  # distinct noise: no two images alike, also within one condition
        for j in range(i + 1, 6):
            assert not torch.allclose(out[i], out[j])
    # diffusers' order: row i*k + j is image j of condition i (= the condition repeated, same noise stream)
    repeated = uni.repeat_interleave(3, dim=0)
    same = pipeline(repeated, generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(out, same)


def test_callbacks_and_return_dict(pipeline):
    uni = torch.randn(1, 1, 1536)
    legacy, modern = [], []
    out = pipeline(
        uni,
        num_inference_steps=4,
        output_type="latent",
        callback=lambda i, t, latents: legacy.append((i, int(t), latents.shape)),
        callback_steps=2,
        callback_on_step_end=lambda pipe, i, t, kw: (modern.append(i), {"latents": kw["latents"] * 0})[1],
        callback_on_step_end_tensor_inputs=["latents"],
        return_dict=False,
        progress=False,
    )
    assert isinstance(out, tuple) and len(out) == 1
    assert [i for i, _, _ in legacy] == [0, 2] and legacy[0][2] == (1, 16, 32, 32)
    assert modern == [0, 1, 2, 3]
    assert torch.count_nonzero(out[0]) == 0  # the returned latents replaced the pipeline's own


def test_hub_call_errors_are_one_line(pipeline):
    uni = torch.randn(1, 1, 1536)
    with pytest.raises(
        ValueError, match=r"height/width 1024x1024: this model makes 256x256 px images from 1"
    ):
        pipeline(uni, height=1024, width=1024, num_inference_steps=1)
    with pytest.raises(ValueError, match="callback_steps 0"):
        pipeline(uni, callback=print, callback_steps=0, num_inference_steps=1)
    with pytest.raises(ValueError, match="negative_uni_embeds: 3 rows for 1 conditions"):
        pipeline(uni, negative_uni_embeds=torch.randn(3, 1, 1536), guidance_scale=2.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipeline(uni, callback_on_step_end=print, callback_on_step_end_tensor_inputs=["prompt_embeds"])


@pytest.fixture(scope="module")
def controlnet_pipe(tiny_vae_dir):
    base = random_pixcell("PixCell-tiny-64")
    controlnet = PixCellControlNet.from_transformer(base, n_controlnet_blocks=2)
    for p in controlnet.parameters():
        p.data.normal_(0, 0.05)
    return PixCellControlNetPipeline.from_parts(base, controlnet, tiny_vae_dir)


def test_controlnet_hub_call_controlnet_input_equals_mask(controlnet_pipe):
    from PIL import Image

    pipe = controlnet_pipe
    binary = np.zeros((64, 64), dtype=np.uint8)
    binary[8:40, 16:48] = 1
    mask = np.repeat(binary[..., None] * 255, 3, axis=2)  # H x W x 3 uint8 RGB, as the Hub callers pass it
    uni_emb = torch.randn(1, 1, 1536)
    uncond = pipe.get_unconditional_embedding(uni_emb.shape[0])
    images = pipe(
        uni_embeds=uni_emb,
        negative_uni_embeds=uncond,
        controlnet_input=mask,
        guidance_scale=1.5,
        num_inference_steps=20,
        num_images_per_prompt=1,
        generator=torch.Generator().manual_seed(0),
        latents=None,
        callback=None,
        callback_steps=1,
        height=64,
        width=64,
    ).images
    native = pipe(uni_emb, mask=binary, guidance_scale=1.5, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(np.asarray(images[0]), np.asarray(native[0]))
    as_pil = pipe(uni_emb, controlnet_input=Image.fromarray(mask), guidance_scale=1.5, num_inference_steps=20,
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert np.array_equal(np.asarray(as_pil[0]), np.asarray(native[0]))
    # k images per condition: the mask goes with each of them
    kw = dict(num_inference_steps=2, output_type="latent", progress=False)
    two = pipe(uni_emb, controlnet_input=mask, num_images_per_prompt=2, controlnet_conditioning_scale=0.5,
               generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip
    assert two.shape == (2, 16, 8, 8) and not torch.allclose(two[0], two[1])
    with pytest.raises(ValueError, match="exactly one of mask="):
        pipe(uni_emb, mask=binary, controlnet_input=mask, **kw)
    with pytest.raises(ValueError, match="controlnet_input 0: 32x32 px, expected 64x64"):
        pipe(uni_emb, controlnet_input=mask[:32, :32], **kw)


# --------------------------------------------------------------------------- published snapshots

# A remote-code file that would fail (and leave a trace) if anything imported or ran it.
REMOTE_CODE = """
import pathlib
pathlib.Path(__file__).with_name("EXECUTED").write_text("the snapshot's Python ran")
raise RuntimeError("the snapshot's Python ran")
"""
SCHEDULER = dict(
    _class_name="DPMSolverMultistepScheduler",
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    algorithm_type="dpmsolver++",
    solver_order=2,
    prediction_type="epsilon",
    timestep_spacing="trailing",  # not our default (linspace): shows that the snapshot's config is used
    variance_type="learned_range",  # what a PixArt scheduler config may say; dropped for DPM-Solver (logged)
)


def write_snapshot(root: Path, model, vae_dir: Path, tag: str, controlnet=None) -> Path:
    """A folder in the published layout with tiny weights, the remote-code files and extra files."""
    components = {
        "transformer": ["pixcell_transformer_2d", "PixCellTransformer2DModel"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    model.save_pretrained(root / "transformer")
    (root / "transformer" / "pixcell_transformer_2d.py").write_text(REMOTE_CODE)
    if controlnet is not None:
        controlnet.save_pretrained(root / "controlnet")
        (root / "controlnet" / "pixcell_controlnet.py").write_text(REMOTE_CODE)
        components["controlnet"] = ["pixcell_controlnet", "PixCellControlNet"]
        (root / "test_mask.png").write_bytes(b"\x89PNG not really")
    shutil.copytree(vae_dir, root / "vae")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": tag, "_diffusers_version": "0.32.2", **components})
    )
    (root / "pipeline.py").write_text(REMOTE_CODE)
    (root / "test_image.png").write_bytes(b"\x89PNG not really")
    (root / "README.md").write_text("model card")
    (root / "extras").mkdir()
    (root / "extras" / "notes.json").write_text("{not json")
    return root


def assert_not_executed(root: Path) -> None:
    assert not list(root.rglob("EXECUTED")), "a snapshot Python file was executed"


def test_published_snapshot_loads_without_running_its_code(tmp_path, tiny_vae_dir, caplog):
    model = random_pixcell("PixCell-tiny-64")
    root = write_snapshot(tmp_path / "PixCell-256", model, tiny_vae_dir, "PixCellPipeline")
    with caplog.at_level("INFO", logger="pixcell.hub"):
        pipe = PixCellPipeline.from_pretrained(
            root, custom_pipeline="StonyBrook-CVLab/PixCell-pipeline", trust_remote_code=True
        )
    assert_not_executed(root)
    assert isinstance(pipe.transformer, type(model)) and "scheduler from" in caplog.text
    # the scheduler config is honoured: class, spacing; the learned variance is not fed to DPM-Solver
    c = pipe.scheduler.config
    assert sampler_name(pipe.scheduler) == "dpm-solver" and c.timestep_spacing == "trailing"
    assert c.variance_type is None
    uni, latents = torch.randn(1, 1, 1536), torch.randn(1, 16, 8, 8)
    kw = dict(num_inference_steps=4, latents=latents, output_type="latent", progress=False)
    cfg = {k: v for k, v in SCHEDULER.items() if k not in ("_class_name", "variance_type")}
    reference = PixCellPipeline(model, pipe.vae, DPMSolverMultistepScheduler(**cfg))
    assert torch.equal(pipe(uni, **kw).images, reference(uni, **kw).images)
    pipe.set_sampler("dpm-solver")  # overridable: back to our linspace default
    assert pipe.scheduler.config.timestep_spacing == "linspace"
    assert not torch.equal(pipe(uni, **kw).images, reference(uni, **kw).images)


def test_diffusers_loader_on_a_snapshot_says_to_use_ours(tmp_path, tiny_vae_dir):
    root = write_snapshot(
        tmp_path / "snap", random_pixcell("PixCell-tiny-64"), tiny_vae_dir, "PixCellPipeline"
    )
    with pytest.raises(
        ValueError, match=r"PixCell snapshot: load it with diffusion\.sampling\.pipeline\.PixCellPipeline"
    ):
        DiffusionPipeline.from_pretrained(root)
    assert_not_executed(root)


def test_controlnet_snapshot_loads_and_wrong_class_is_one_line(tmp_path, tiny_vae_dir):
    base = random_pixcell("PixCell-tiny-64")
    controlnet = PixCellControlNet.from_transformer(base, n_controlnet_blocks=1)
    root = write_snapshot(tmp_path / "cn", base, tiny_vae_dir, "PixCellControlNetPipeline", controlnet)
    pipe = PixCellControlNetPipeline.from_pretrained(root, trust_remote_code=True)
    assert_not_executed(root)
    assert pipe.controlnet.num_blocks == 1 and pipe.scheduler.config.timestep_spacing == "trailing"
    out = pipe(torch.randn(1, 1, 1536), controlnet_input=np.zeros((64, 64, 3), np.uint8), num_inference_steps=2,
               output_type="latent", progress=False).images  # fmt: skip
    assert out.shape == (1, 16, 8, 8)
    with pytest.raises(ValueError, match="a PixCellControlNetPipeline snapshot; load it with"):
        PixCellPipeline.from_pretrained(root)
    with pytest.raises(ValueError, match=r"PixCell snapshot: load it with .*PixCellControlNetPipeline"):
        DiffusionPipeline.from_pretrained(root)
    (root / "model_index.json").unlink()  # the ControlNet layout alone is a snapshot too
    assert PixCellControlNetPipeline.from_pretrained(root).scheduler.config.timestep_spacing == "trailing"
    assert_not_executed(root)


def test_hub_id_fetches_config_and_weights_only(tmp_path, tiny_vae_dir, monkeypatch):
    """A hub id goes through `snapshot_download` without Python files or images; the model card's `vae=` object
    is used as given (its vae/ is then not fetched)."""
    import huggingface_hub

    from diffusion.encoders import load_vae

    model = random_pixcell("PixCell-tiny-64")
    root = write_snapshot(tmp_path / "cache", model, tiny_vae_dir, "PixCellPipeline")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kw):
        calls.append((repo_id, allow_patterns, ignore_patterns))
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sd3_vae = load_vae(tiny_vae_dir)
    pipe = PixCellPipeline.from_pretrained("StonyBrook-CVLab/PixCell-256", vae=sd3_vae, torch_dtype=torch.float32,
                                           custom_pipeline="StonyBrook-CVLab/PixCell-pipeline", trust_remote_code=True)  # fmt: skip
    assert_not_executed(root)
    ((repo, allow, ignore),) = calls
    assert (
        repo == "StonyBrook-CVLab/PixCell-256"
        and "*.py" in ignore
        and "*.png" in ignore
        and "vae/*" in ignore
    )
    assert not any(p.endswith(".py") for p in allow)
    assert pipe.vae is sd3_vae and pipe.scheduler.config.timestep_spacing == "trailing"
