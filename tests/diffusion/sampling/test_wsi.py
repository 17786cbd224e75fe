"""Whole-slide engine: bands equal the in-memory sliding-window update, kill -9 and a rerun give the same pixels,
processes share the bands, a grid edit changes only the windows it touches, decode weights sum to one, and the
pyramid opens in openslide and tiffslide with its levels and MPP."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from diffusion.sampling.disk import DiskArray
from diffusion.sampling.large_image import denoise_region
from diffusion.sampling.pyramid import write_pyramid
from diffusion.sampling.wsi import WSIRun, WSISettings, prepare_work, ramp_weights
from diffusion.standins import build_micro_vae, build_tiny_t16

C = 96
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t16():
    """A tiny 1024-style model: 4 x 4 tokens per window of 16 latent px (128 px, 32 px per token)."""
    return build_tiny_t16(C)


def grid_of(rows: int, cols: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols, C)).astype(np.float32)


def make_run(work, model, vae, grid, **kw) -> WSIRun:
    settings = WSISettings(
        progress=False,
        **{
            "steps": 3,
            "guidance": 2.5,
            "stride": 8,
            "decode_tile": 16,
            "decode_margin": 4,
            "compression": "deflate",
            **kw,
        },
    )
    return WSIRun(work, model, vae, prepare_work(work, grid, settings.plan_keys()), settings)


def pixels(run: WSIRun) -> np.ndarray:
    return run.pixels.read(0, run.pixels.shape[0])


def test_bands_equal_the_in_memory_sliding_window_update(t16, tmp_path):
    grid = grid_of(8, 12)
    run = make_run(tmp_path / "w", t16, build_micro_vae(), grid)
    run.run(tmp_path / "w" / "slide.tif")
    final = torch.from_numpy(run.x[run.steps % 2].read(0, run.height)).permute(2, 0, 1)[None]
    noise = run._noise(0, run.height).permute(2, 0, 1)[None]
    ref = denoise_region(
        t16,
        torch.from_numpy(grid),
        stride=8,
        num_inference_steps=3,
        guidance_scale=2.5,
        latents=noise,
        progress=False,
    )
    assert ref.abs().max() > 1 and (final - ref).abs().max() <= 1e-5 * ref.abs().max()
    # The step files are gone once a step is done; the decode covered every pixel row.
    assert not list((tmp_path / "w" / "rows").glob("*.npy"))
    assert len(list((tmp_path / "w" / "sched").glob("*.pt"))) == len(run.bands)  # the last step's states


def test_decode_weights_sum_to_one():
    for length, tile, margin in ((100, 16, 4), (64, 64, 8), (72, 32, 8), (40, 16, 0)):
        total = np.zeros(length)
        for a, b, w in ramp_weights(length, list(range(0, length, tile)), tile, margin):
            total[a:b] += w
        assert np.allclose(total, 1.0), (length, tile, margin)


def _wait_for(path, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not path.exists():
        if time.time() > end:
            raise TimeoutError(path)
        time.sleep(0.01)


def test_kill_9_and_rerun_give_the_same_pixels_and_processes_share_the_bands(t16, tmp_path):
    vae, grid = build_micro_vae(), grid_of(12, 8)
    whole = make_run(tmp_path / "whole", t16, vae, grid, steps=4)
    whole.run(tmp_path / "whole.tif")
    # A real process, killed with SIGKILL in the middle of step 2, then the same run again here.
    work = tmp_path / "killed"
    run = make_run(work, t16, vae, grid, steps=4)
    pid = os.fork()
    if pid == 0:  # the child: run until killed
        try:
            run.run(work / "slide.tif")
        finally:
            os._exit(0)
    _wait_for(work / "done" / "s2_w1")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert not (work / "done" / "pyramid").exists()
    done_before = len(list((work / "done").iterdir()))
    ran = make_run(work, t16, vae, grid, steps=4).run(work / "slide.tif")
    assert ran < len(run.tasks(work / "slide.tif")) - done_before + 1  # finished tasks were not redone
    assert np.array_equal(pixels(run), pixels(whole))
    # Two processes on one folder share the tasks and make the same slide.
    shared = tmp_path / "shared"
    make_run(shared, t16, vae, grid, steps=4)  # set up before forking
    pid = os.fork()
    if pid == 0:
        try:
            n = make_run(shared, t16, vae, grid, steps=4).run(shared / "slide.tif")
            (shared / "child_ran").write_text(str(n))
        finally:
            os._exit(0)
    here = make_run(shared, t16, vae, grid, steps=4).run(shared / "slide.tif")
    os.waitpid(pid, 0)
    there = int((shared / "child_ran").read_text())
    assert here + there == len(run.tasks(shared / "slide.tif")) and here > 0 and there > 0
    assert np.array_equal(pixels(make_run(shared, t16, vae, grid, steps=4)), pixels(whole))


def test_a_grid_edit_changes_only_the_windows_it_touches(t16, tmp_path):
    """Windows side by side (stride = window): an edited token changes its own window's latents only, and the
    pixels of the decode blocks that meet that window (each reaches `decode_margin` into its neighbours);
    everything else is identical, as the noise is seeded per tile."""
    vae, grid = build_micro_vae(), grid_of(16, 16)
    edited = grid.copy()
    edited[5, 6] += 50.0  # token row 5, col 6: the window of tokens [4, 8) x [4, 8) = latent px [16, 32)^2
    runs = [
        make_run(tmp_path / name, t16, vae, g, stride=16, decode_tile=8)
        for name, g in (("a", grid), ("b", edited))
    ]
    for run in runs:
        run.run(run.work / "slide.tif")
    la, lb = (torch.from_numpy(r.x[r.steps % 2].read(0, r.height)) for r in runs)
    changed = (la - lb).abs().amax(dim=2) > 0  # (H, W) latent px
    window = torch.zeros_like(changed)
    window[16:32, 16:32] = True
    assert changed[window].all() and not changed[~window].any()
    diff = np.abs(pixels(runs[0]).astype(int) - pixels(runs[1]).astype(int)).max(axis=2) > 0
    # Decode blocks [8k - 4, 8k + 12) latent px meet [16, 32) for k = 1..4: they cover latent px [4, 44).
    reach = np.zeros_like(diff)
    reach[4 * 8 : 44 * 8, 4 * 8 : 44 * 8] = True
    assert diff[16 * 8 : 32 * 8, 16 * 8 : 32 * 8].mean() > 0.1 and not diff[~reach].any()
    assert (~reach).mean() > 0.5  # most of the slide is outside and unchanged


def test_pyramid_opens_in_openslide_and_tiffslide(tmp_path):
    import openslide
    import tiffslide

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (700, 1100, 3), dtype=np.uint8)
    level0 = DiskArray(tmp_path / "level0.npy", image.shape, "uint8")
    level0.write(0, image)
    shapes = write_pyramid(level0, tmp_path / "slide.tif", mpp=0.5, magnification=20, compression="deflate")
    assert shapes == [(700, 1100), (350, 550), (175, 275), (88, 138)]  # halved until one 256 px tile
    for slide in (openslide.OpenSlide(tmp_path / "slide.tif"), tiffslide.TiffSlide(tmp_path / "slide.tif")):
        prefix = "openslide" if isinstance(slide, openslide.OpenSlide) else "tiffslide"
        assert slide.level_dimensions == ((1100, 700), (550, 350), (275, 175), (138, 88))
        assert float(slide.properties[f"{prefix}.mpp-x"]) == 0.5
        assert float(slide.properties[f"{prefix}.objective-power"]) == 20
        region = np.asarray(slide.read_region((0, 0), 0, (1100, 700)).convert("RGB"))
        assert np.array_equal(region, image)  # deflate tiles are lossless
    assert "thumbnail" in openslide.OpenSlide(tmp_path / "slide.tif").associated_images
    with pytest.raises(ValueError, match="TIFF compression 'lzw'"):
        write_pyramid(level0, tmp_path / "x.tif", compression="lzw")


def test_a_rerun_with_other_settings_is_refused(t16, tmp_path):
    grid = grid_of(4, 4)
    make_run(tmp_path, t16, build_micro_vae(), grid)
    with pytest.raises(ValueError, match="holds a run with another seed"):
        make_run(tmp_path, t16, build_micro_vae(), grid, seed=1)
    with pytest.raises(ValueError, match="holds a run with another grid_sha256"):
        make_run(tmp_path, t16, build_micro_vae(), grid + 1)
    with pytest.raises(ValueError, match="cannot step a slide band by band"):
        make_run(tmp_path / "e", t16, build_micro_vae(), grid, sampler="euler-ancestral")
