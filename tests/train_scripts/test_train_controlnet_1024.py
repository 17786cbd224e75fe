"""The cell-mask ControlNet at 1024 px (PixCell-1024's 16 UNI tokens), through the same trainer and sampling path,
with a tiny base: train two steps, sample with the Hub call's `controlnet_input`, configs load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.checkpoints import latest_checkpoint
from diffusion.config import load_config
from diffusion.model.controlnet import load_controlnet
from diffusion.sampling.controlnet_pipeline import PixCellControlNetPipeline
from diffusion.standins import random_pixcell
from tests.helpers.mask_pairs import write_pairs
from tests.helpers.paths import REPO
from train_scripts.train_controlnet import cli

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models

SCHEMA = REPO / "configs" / "_base_" / "controlnet.py"


def test_controlnet_1024_trains_and_samples(tmp_path, tiny_uni_dir):
    from diffusion.standins import build_tiny_vae

    # The shared tiny VAE has mid-block attention over all 128 x 128 latents: minutes at 1024 px on a CPU.
    build_tiny_vae(tmp_path / "vae", block_out_channels=(16, 16, 16, 16), mid_attention=False)
    tiny_vae_dir = tmp_path / "vae"
    write_pairs(tmp_path, 2, size=1024)
    cfg = load_config(REPO / "configs" / "controlnet" / "tiny_1024.py", schema_file=SCHEMA)
    base = random_pixcell(cfg.model, **dict(cfg.model_overrides))
    base.save_pretrained(tmp_path / "base")
    work = tmp_path / "work"
    argv = ["configs/controlnet/tiny_1024.py", "--work-dir", str(work), "--images", str(tmp_path / "images"),
            "--masks", str(tmp_path / "masks"), "--uni", str(tiny_uni_dir), "--base-model", str(tmp_path / "base"),
            "--vae", str(tiny_vae_dir), "--report-to", "none", "--cfg-options", "max_steps=1"]  # fmt: skip
    assert cli(argv) == 0
    assert np.load(tmp_path / "images" / "p0_uni.npy").shape == (16, 96)  # 4 x 4 tiles of 256 px
    controlnet = load_controlnet(latest_checkpoint(work) / "controlnet")
    assert controlnet.config.sample_size == 128 and controlnet.controlnet_blocks[0].weight.abs().sum() > 0

    pipe = PixCellControlNetPipeline.from_parts(tmp_path / "base", controlnet, tiny_vae_dir)
    mask = np.asarray(Image.open(tmp_path / "masks" / "p1.png")) > 0
    rgb = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)  # the Hub call's controlnet_input
    uni = torch.from_numpy(np.load(tmp_path / "images" / "p1_uni.npy").astype(np.float32))[None]
    kw = dict(
        num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", progress=False
    )
    out = pipe(uni_embeds=uni, controlnet_input=rgb, height=1024, width=1024, **kw).images
    same = pipe(uni, mask=mask, **dict(kw, generator=torch.Generator().manual_seed(0))).images
    assert out.shape == (1, 1024, 1024, 3) and np.array_equal(out, same)


def test_published_1024_config():
    cfg = load_config(REPO / "configs" / "controlnet" / "pixcell_1024_cell.py", schema_file=SCHEMA)
    assert (cfg.resolution, cfg.model, cfg.base_model) == (
        1024,
        "PixCell-XL/2-1024",
        "StonyBrook-CVLab/PixCell-1024",
    )
    assert cfg.controlnet.n_blocks == 27 and cfg.train_batch_size * cfg.gradient_accumulation_steps == 4
