"""Dense per-window conditions (diffusion/sampling/dense_conditions.py): a one-token model at half-window stride
takes each window's condition from the reference crop under that window, deterministically, in the library and
through tools.sample_4k --image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.command import run_cli
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.dense_conditions import dense_layout, dense_window_conditions
from diffusion.sampling.large_image import denoise_region
from tools.sample_4k import main

pytestmark = pytest.mark.usefixtures("one_thread")

C = 96  # the tiny UNI stand-in's width (conftest tiny_uni_dir)


def pooled_embed(images: torch.Tensor, tile: int) -> torch.Tensor:
    """A transparent 'encoder': each tile -> its 4 x 8 average-pooled pixels of R, G, B (96 values)."""
    x = images.float()
    b, _, h, w = x.shape
    tiles = x.unfold(2, tile, tile).unfold(3, tile, tile)  # (B, 3, h/t, w/t, t, t)
    tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, tile, tile)
    feats = F.adaptive_avg_pool2d(tiles, (4, 8)).reshape(b, (h // tile) * (w // tile), C)
    return feats


@pytest.fixture(scope="module")
def one_token():
    """PixCell-tiny-64: one token per window of 8 latent px (64 px), random non-zero head."""
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-64", caption_channels=C).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model


def test_each_window_gets_the_crop_under_it():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 255, (3, 192, 192), dtype=np.uint8))
    layout = dense_layout(24, 24, window=8, stride=4)  # 3 x 3 tiles of 64 px, half-window stride
    assert len(layout.positions) == 25
    conds = dense_window_conditions(image, layout, 1, pooled_embed)
    assert conds.shape == (25, 1, C)
    for i, (y, x) in enumerate(layout.positions):
        crop = image[:, 8 * y : 8 * y + 64, 8 * x : 8 * x + 64]
        assert torch.equal(conds[i], pooled_embed(crop[None], 64)[0])
    # a half-window offset is a different crop: the window at (0, 4) is not the tile at (0, 0) or (0, 8)
    assert not torch.equal(conds[1], conds[0]) and not torch.equal(conds[1], conds[2])
    assert torch.equal(conds, dense_window_conditions(image, layout, 1, pooled_embed, batch=3))
    # four tokens per window (a 2 x 2-token model): each window's four tiles, row-major
    four = dense_window_conditions(image, layout, 2, pooled_embed)
    assert four.shape == (25, 4, C)
    y, x = layout.positions[6]
    assert torch.equal(
        four[6, 3], pooled_embed(image[None, :, 8 * y + 32 : 8 * y + 64, 8 * x + 32 : 8 * x + 64], 32)[0, 0]
    )
    with pytest.raises(ValueError, match="does not cover"):
        dense_window_conditions(image[:, :128], layout, 1, pooled_embed)
    with pytest.raises(ValueError, match="does not step from edge to edge"):
        dense_layout(24, 24, window=8, stride=5)


def test_one_token_model_denoises_with_the_dense_conditions(one_token):
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 255, (3, 192, 192), dtype=np.uint8))
    layout = dense_layout(24, 24, window=8, stride=4)
    conds = dense_window_conditions(image, layout, 1, pooled_embed)
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())

    handle = one_token.register_forward_pre_hook(record, with_kwargs=True)
    latents = torch.randn(1, 16, 24, 24, generator=torch.Generator().manual_seed(0))
    grid = torch.zeros(3, 3, C)  # sets the region's size only
    try:
        kw = dict(stride=4, num_inference_steps=2, guidance_scale=2.0, progress=False, window_conds=conds)
        first = denoise_region(one_token, grid, latents=latents.clone(), **kw)
    finally:
        handle.remove()
    assert len(seen) == 2  # one batched forward per step: 25 conditional rows, then 25 null rows
    null = one_token.null_condition(25)
    for batch in seen:
        assert batch.shape == (50, 1, C)
        assert torch.equal(batch[:25], conds) and torch.equal(batch[25:], null)
    again = denoise_region(one_token, grid, latents=latents.clone(), **kw)
    assert torch.equal(first, again)
    # the token-grid path cannot step by half a one-token window
    with pytest.raises(ValueError, match="expected a multiple of 8"):
        denoise_region(one_token, grid, latents=latents.clone(), **{**kw, "window_conds": None})


def test_sample_4k_image_at_half_window_stride(one_token, tiny_vae_dir, tiny_uni_dir, tmp_path):
    model_dir = tmp_path / "model"
    one_token.save_pretrained(model_dir)
    big = np.random.default_rng(2).integers(0, 255, (192, 128, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        argv = ["--model", str(model_dir), "--vae", str(tiny_vae_dir), "--uni", str(tiny_uni_dir)]
        argv += ["--out", str(out), "--steps", "2", "--device", "cpu", "--no-progress"]
        argv += ["--image", str(tmp_path / "big.png")]
        assert run_cli(main, argv) == 0
    row = json.loads((outs[0] / "manifest.jsonl").read_text().splitlines()[0])
    assert row["dense_stride"] == 4  # the default: half of the 8-latent-px window
    a, b = (np.asarray(Image.open(out / "syn" / "big.png")) for out in outs)
    assert a.shape == (192, 128, 3) and np.array_equal(a, b)
