"""tools.sample_wsi end to end: a 4,096^2 px region in bounded memory written as a pyramid that openslide and
tiffslide open with the right levels and MPP; a real-slide region with img2img + inpainting; one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion.command import run_cli
from diffusion.standins import save_wsi_models
from tools.sample_wsi import main

C = 96
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny T16 model (32 px per token) and the smallest f8 VAE, saved as the tool loads them."""
    root = tmp_path_factory.mktemp("wsi_models")
    save_wsi_models(root, C)
    return root


def test_a_4096_px_region_in_bounded_memory_opens_as_a_pyramid(models, tmp_path):
    import openslide
    import tiffslide

    grid = (
        np.random.default_rng(0).standard_normal((128, 128, C)).astype(np.float32)
    )  # 4,096 px at 32 px/token
    np.save(tmp_path / "grid.npy", grid)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "tools.sample_wsi",
        "--model",
        str(models / "model"),
        "--vae",
        str(models / "vae"),
        "--grid",
        str(tmp_path / "grid.npy"),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--steps",
        "1",
        "--guidance",
        "1",
        "--stride",
        "16",
        "--window-batch",
        "512",
        "--decode-tile",
        "32",
        "--decode-margin",
        "4",
        "--vae-batch",
        "1",
        "--format",
        "jpeg",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["size_px"] == [4096, 4096] and summary["windows_per_step"] == 1024
    # Bounded memory: the run adds far less than one float32 copy of the image (201 MB), which the in-memory
    # path (large_image.decode_region: image + weights, 268 MB) holds at once.
    grown = summary["peak_rss_mb"] - summary["rss_before_run_mb"]
    assert grown < 150, summary
    for slide in (openslide.OpenSlide(out / "slide.tif"), tiffslide.TiffSlide(out / "slide.tif")):
        prefix = "openslide" if isinstance(slide, openslide.OpenSlide) else "tiffslide"
        assert slide.level_dimensions == tuple((4096 >> i, 4096 >> i) for i in range(5))
        assert float(slide.properties[f"{prefix}.mpp-x"]) == 0.5
        assert float(slide.properties[f"{prefix}.objective-power"]) == 20
        tile = np.asarray(slide.read_region((2048, 2048), 0, (256, 256)).convert("RGB"))
        assert tile.std() > 1  # pixels, not an empty canvas
    # The bulky work files are gone; the markers say the slide is done, so a rerun does nothing.
    assert not (out / "work" / "x0.npy").exists() and (out / "work" / "done" / "pyramid").exists()


def test_slide_region_img2img_and_inpainting(models, tiny_uni_dir, real_slide, tmp_path):
    """A real-slide region (UNI tokens on the fly), started from its own pixels (SDEdit strength 0.75) with a
    mask over its right quarter: pixels that no decode block of the masked area reaches are the VAE round trip
    of the slide (through the same tiled decode), the masked ones are regenerated."""
    import argparse

    import tiffslide

    from diffusion.encoders import load_vae
    from diffusion.model.loading import load_transformer
    from diffusion.sampling.wsi import WSIRun, WSISettings, encode_region, prepare_work
    from tools.sample_wsi import read_init

    mask = np.zeros((64, 64), np.uint8)
    mask[:, 48:] = 255  # latent columns 24..31 of 32 (and 4 more of feathering)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    region = [0, 0, 2048, 1024]
    argv = [
        "--model",
        str(models / "model"),
        "--vae",
        str(models / "vae"),
        "--uni",
        str(tiny_uni_dir),
        "--device",
        "cpu",
        "--steps",
        "4",
        "--stride",
        "16",
        "--decode-tile",
        "16",
        "--decode-margin",
        "4",
        "--no-progress",
        "--slide",
        str(real_slide),
        "--region",
        *map(str, region),
        "--init-from-slide",
        "--strength",
        "0.75",
        "--mask",
        str(tmp_path / "mask.png"),
        "--out",
        str(tmp_path / "out"),
        "--view",
    ]
    assert run_cli(main, argv) == 0
    assert (tmp_path / "out" / "viewer" / "index.html").is_file() and (
        tmp_path / "out" / "viewer" / "slide.dzi"
    ).is_file()
    grid = np.load(tmp_path / "out" / "grid.npy")
    assert grid.shape == (4, 8, C)  # 1024 x 2048 level-0 px at 0.5 um/px = 4 x 8 tiles of 256 px
    out = (
        tiffslide.TiffSlide(tmp_path / "out" / "slide.tif").read_region((0, 0), 0, (256, 128)).convert("RGB")
    )
    out = np.asarray(out).astype(int)
    # The round trip: the same pixels (32 px per token for this tiny model) encoded, then decoded by the engine.
    vae = load_vae(models / "vae", subfolder=None)
    init = read_init(argparse.Namespace(init=None, slide=str(real_slide), mpp=None, region=region), 4, 8, 32)
    settings = WSISettings(
        steps=4, stride=16, decode_tile=16, decode_margin=4, compression="deflate", progress=False
    )
    ref = WSIRun(
        tmp_path / "ref",
        load_transformer(models / "model"),
        vae,
        prepare_work(tmp_path / "ref", grid, settings.plan_keys()),
        settings,
    )
    ref.x[ref.steps % 2].write(0, encode_region(vae, init))
    for task in ref.tasks(tmp_path / "ref.tif"):
        if task.name.startswith(("decode", "seam")):
            task.run()
    trip = ref.pixels.read(0, 128).astype(int)
    # Decode block 0 (latent columns 0..19) sees no masked latent: its own pixels (0..95) are the round trip.
    left, right = (slice(None), slice(0, 96)), (slice(None), slice(192, 256))
    assert np.abs(out[left] - trip[left]).max() <= 1
    assert np.abs(out[right] - trip[right]).mean() > 10


def test_one_line_errors(models, tmp_path, capsys):
    base = [
        "--model",
        str(models / "model"),
        "--vae",
        str(models / "vae"),
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    ]
    np.save(tmp_path / "g.npy", np.zeros((8, 8, 7), np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((8, 8, C), np.float32))
    cases = [
        ([], "give exactly one condition source"),
        (["--grid", str(tmp_path / "g.npy"), "--prior", str(tmp_path)], "give exactly one condition source"),
        (["--grid", str(tmp_path / "nope.npy")], "--grid"),
        (
            ["--grid", str(tmp_path / "g.npy"), "--strength", "0.5"],
            "--strength below 1 and --mask need an image",
        ),
        (
            ["--grid", str(tmp_path / "g.npy"), "--strength", "2", "--init", str(tmp_path / "g.npy")],
            "--strength 2",
        ),
        (["--prior", str(tmp_path)], "--prior needs --grid-size"),
        (
            ["--grid", str(tmp_path / "g.npy"), "--region", "0", "0", "8", "8"],
            "--region and --mpp go with --slide",
        ),
        (["--grid", str(tmp_path / "g.npy")], "7 channels per token, the model takes 96"),
        (["--grid", str(tmp_path / "ok.npy"), "--stride", "6"], "--stride 6"),
    ]
    for argv, message in cases:
        assert run_cli(main, [*base, *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
