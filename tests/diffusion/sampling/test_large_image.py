"""Sliding-window large regions: layout rules, batched windows against the one-window reference, blended decoding
without seams, OOM back-off, and tools.sample_4k end to end (grid, real image, dataset region; resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.command import run_cli
from diffusion.encoders import decode_latents
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.large_image import (
    Chunker,
    decode_region,
    denoise_region,
    window_conditions,
    window_layout,
)
from diffusion.standins import build_tiny_vae, reference_eps_fn
from tools.sample_4k import main

C = 96


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models


@pytest.fixture(scope="module")
def t16(tmp_path_factory):
    """A tiny 1024-style model: T = 16 tokens (4 x 4), windows of 16 latent px (128 px, 32 px per token)."""
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-128-T16", caption_channels=C).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    folder = tmp_path_factory.mktemp("t16")
    model.save_pretrained(folder)
    return model, folder


def test_layout_rules_and_messages():
    lay = window_layout(512, 512, 128, 64, 4)  # PixCell-1024 over 4096 px at stride 64
    assert len(lay.positions) == 49 and lay.tile == 32
    cov = lay.coverage()
    assert cov.min() == 1 and cov.max() == 4 and cov[100, 100] == 4
    assert len(window_layout(512, 512, 128, 32, 4).positions) == 13 * 13
    assert len(window_layout(512, 1024, 128, 128, 4).positions) == 4 * 8  # rectangles too
    with pytest.raises(ValueError, match="stride 48 latent px: expected a multiple of 32"):
        window_layout(512, 512, 128, 48, 4)
    with pytest.raises(ValueError, match="does not step from edge to edge"):
        window_layout(320, 320, 128, 128, 4)
    with pytest.raises(ValueError, match="at least one window"):
        window_layout(96, 512, 128, 32, 4)


def test_window_conditions_are_each_windows_own_subgrid():
    grid = torch.randn(16, 16, 8)  # a 4096 px region's token grid
    lay = window_layout(512, 512, 128, 64, 4)
    conds = window_conditions(grid, lay)
    assert conds.shape == (49, 16, 8)
    for k, (y, x) in enumerate(lay.positions):
        expected = grid[y // 32 : y // 32 + 4, x // 32 : x // 32 + 4].reshape(16, 8)
        assert torch.equal(conds[k], expected)


@pytest.mark.parametrize("stride, sampler, batch", [(8, "dpm-solver", 4), (16, "ddpm", None)])
def test_batched_windows_equal_the_one_window_reference(t16, stride, sampler, batch):
    model, _ = t16
    grid = torch.randn(8, 8, C, generator=torch.Generator().manual_seed(1))  # 256 px: 2 x 2 windows wide
    latents = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    kw = dict(stride=stride, sampler=sampler, num_inference_steps=3, guidance_scale=2.5, latents=latents,
              progress=False)  # fmt: skip
    fast = denoise_region(model, grid, window_batch=batch, generator=torch.Generator().manual_seed(3), **kw)
    ref = denoise_region(
        model, grid, window_eps=reference_eps_fn, generator=torch.Generator().manual_seed(3), **kw
    )
    scale = ref.abs().max()
    assert torch.isfinite(fast).all() and scale > 0.1
    assert (fast - ref).abs().max() <= 1e-4 * scale
    # The conditions matter: another grid in one window's tiles changes the region there.
    other = grid.clone()
    other[:4, :4] += 1.0
    moved = denoise_region(model, other, window_batch=batch, generator=torch.Generator().manual_seed(3), **kw)
    assert (moved - fast)[..., :16, :16].abs().max() > 1e-3


def test_chunker_halves_on_out_of_memory():
    seen, done = [], []

    def fn(a, b):
        seen.append(b - a)
        if b - a > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        done.extend(range(a, b))

    chunker = Chunker(None, "test")
    chunker.run(10, fn)
    assert done == list(range(10)) and chunker.size == 2 and seen[:3] == [10, 5, 2]
    seen.clear()
    chunker.run(4, fn)  # the lowered size is kept
    assert seen == [2, 2]


def test_blended_decode_has_no_seams_on_a_constant_latent(tmp_path):
    """A constant latent decodes to a constant colour away from the border. Window decodes have border artifacts
    (zero padding); the Gaussian blend must hide them: compare with decoding the whole latent at once."""
    vae = build_tiny_vae(tmp_path / "vae", block_out_channels=(16, 16, 16))  # f4: cheap at 256 px
    z = 0.7 + torch.linspace(-1, 1, 16).view(1, 16, 1, 1).expand(1, 16, 64, 64)
    full = decode_latents(vae, z)  # (1, 3, 256, 256)
    inner = (slice(None), slice(None), slice(48, -48), slice(48, -48))
    colour = full[..., 128:129, 128:129]
    assert (full - colour)[inner].abs().max() < 1e-3  # the reference is flat inside
    blended = decode_region(vae, z, window=32, stride=16, sigma=0.3, vae_batch=4)
    flat = decode_region(vae, z, window=32, stride=16, sigma=100.0, vae_batch=9)  # ~uniform weights
    dev, dev_flat = (blended - colour)[inner].abs().max(), (flat - colour)[inner].abs().max()
    assert dev < 0.04, dev  # < 10/255 where single windows are off by far more
    assert dev < dev_flat / 4, (dev, dev_flat)
    # No jumps at window borders (every 64 px): neighbouring columns/rows differ little everywhere inside.
    img = blended[inner]
    assert img.diff(dim=-1).abs().max() < 0.03 and img.diff(dim=-2).abs().max() < 0.03
    assert flat[inner].diff(dim=-1).abs().max() > 0.1  # (the check sees the seams of a plain average)
    with pytest.raises(ValueError, match="decode stride 12"):
        decode_region(vae, z, window=32, stride=12)


def test_sample_4k_cli_grid_image_and_dataset_region(t16, tiny_vae_dir, tiny_uni_dir, tmp_path, capsys):
    _, model_dir = t16
    rng = np.random.default_rng(0)
    np.save(tmp_path / "grid.npy", rng.standard_normal((8, 8, C)).astype(np.float32))  # 256 px region
    big = rng.integers(0, 255, (256, 384, 3), dtype=np.uint8)  # a 2 x 3 windows real image
    Image.fromarray(big).save(tmp_path / "big.png")
    # A dataset slide: 128 px patches (4 x 4 tokens of 32 px) with their features; a 2 x 2 patch region.
    slide = tmp_path / "patches" / "ds" / "grp" / "single_128" / "s1"
    slide.mkdir(parents=True)
    for r in range(2):
        for c in range(3):
            Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(slide / f"{r}_{c}.png")
            np.save(slide / f"{r}_{c}_uni.npy", rng.standard_normal((16, C)).astype(np.float16))
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--vae", str(tiny_vae_dir), "--uni", str(tiny_uni_dir), "--out", str(out),
            "--steps", "2", "--stride", "8", "--decode-stride", "16", "--device", "cpu", "--no-progress",
            "--grid", str(tmp_path / "grid.npy"), "--image", str(tmp_path / "big.png"),
            "--data-root", str(tmp_path / "patches"), "--region", "ds/grp/single_128/s1", "0", "1",
            "--region-size", "256"]  # fmt: skip
    assert run_cli(main, argv) == 0
    rows = {r["name"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert set(rows) == {"grid", "big", "ds/grp/single_128/s1/0_1_256px"}
    assert np.asarray(Image.open(out / "syn" / "big.png")).shape == (256, 384, 3)
    assert np.array_equal(np.asarray(Image.open(out / "real" / "big.png")), big)
    assert rows["grid"]["real"] is None and rows["grid"]["stride"] == 8 and rows["grid"]["guidance"] == 1.2
    stitched = np.asarray(Image.open(out / "real" / "ds/grp/single_128/s1/0_1_256px.png"))
    assert np.array_equal(stitched[:128, 128:], np.asarray(Image.open(slide / "0_2.png")))
    before = {p: p.stat().st_mtime_ns for p in (out / "syn").rglob("*.png")}
    assert run_cli(main, argv) == 0  # rerun: everything is done, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in (out / "syn").rglob("*.png")} == before
    capsys.readouterr()
    # Errors: a stride off the tile grid, a region that is not a multiple of the window, a missing patch.
    bad = argv[: argv.index("--grid")]
    assert run_cli(main, [*bad, "--grid", str(tmp_path / "grid.npy"), "--stride", "6"]) == 2
    assert "stride 6 latent px: expected a multiple of 4" in capsys.readouterr().err
    Image.fromarray(big[:200]).save(tmp_path / "odd.png")
    assert run_cli(main, [*bad, "--image", str(tmp_path / "odd.png")]) == 2
    assert "odd.png: region 200x384 px; expected multiples of 128 px" in capsys.readouterr().err
    assert run_cli(main, [*bad, "--data-root", str(tmp_path / "patches"), "--region", "ds/grp/single_128/s1",
                          "1", "1", "--region-size", "256"]) == 2  # fmt: skip
    assert "patch 2_1 missing" in capsys.readouterr().err
