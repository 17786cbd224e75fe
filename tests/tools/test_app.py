"""The Gradio app (tools/app.py) on tiny random models: one-line start-up errors before any server, the API through
gradio_client (references, variants, staining, the queue), and the page in a real browser (headless Chromium from
the Debian packages, driven by Selenium: upload a real slide tile, generate, download, click the slide, bad upload).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.command import run_cli
from tests.helpers.app_browser import (
    AppPage,
    browser_missing,
    chromium,
    close_browser,
    serve_app,
    tissue_tile,
    wait_download,
    wait_for,
)

N_MAX = 4  # --max-variants of the test server
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins: a T=1 256 px PixCell, the staining parts (T=16 PixCell + LoRA + flow MLP, VAE), and a
    UNI2-h-shaped ViT without layer scale (features that differ between images, so cosines mean something)."""
    from diffusion.model.pixcell_transformer import build_pixcell
    from diffusion.standins import TINY_UNI_DIM, build_tiny_uni
    from virtual_staining.tiny import build_tiny_parts

    out = tmp_path_factory.mktemp("app_models")
    parts = build_tiny_parts(out / "staining")
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-256", caption_channels=TINY_UNI_DIM).eval()
    for p in model.parameters():  # a non-zero head, so conditions and guidance change the images
        p.data.normal_(0, 0.02)
    model.save_pretrained(out / "t1")
    build_tiny_uni(out / "uni", embed_dim=TINY_UNI_DIM, init_values=None)
    from diffusion.prior import UNIPrior

    UNIPrior(
        num_tokens=1, channels=TINY_UNI_DIM, width=32, depth=1, labels=["tumour", "stroma"]
    ).save_pretrained(out / "prior")
    return {
        "prior": out / "prior",
        "model": out / "t1",
        "vae": parts.vae,
        "uni": out / "uni",
        "stain_model": parts.transformer,
        "lora": parts.lora,
        "flow": parts.flow,
    }


@pytest.fixture(scope="module")
def files(real_slide, tmp_path_factory) -> dict[str, Path]:
    """A real 256 px and a real 1024 px tissue tile of the slide, and uploads that must be refused or cropped."""
    d = tmp_path_factory.mktemp("uploads")
    out = {"tile": d / "tile.png", "tile1024": d / "tile1024.png"}
    Image.fromarray(tissue_tile(real_slide, 256)).save(out["tile"])
    Image.fromarray(tissue_tile(real_slide, 1024)).save(out["tile1024"])
    out["notes"] = d / "notes.txt"
    out["notes"].write_text("not an image\n")
    data = out["tile"].read_bytes()
    out["truncated"] = d / "truncated.png"
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["small"] = d / "small.png"
    Image.fromarray(tissue_tile(real_slide, 256)[:100, :120]).save(out["small"])
    out["large"] = d / "large.jpg"
    Image.fromarray(tissue_tile(real_slide, 1024)[:300, :320]).save(out["large"], quality=95)
    return out


def server_args(models: dict[str, Path], slide: Path) -> list[str]:
    return [
        "--model",
        str(models["model"]),
        "--vae",
        str(models["vae"]),
        "--uni",
        str(models["uni"]),
        "--slide",
        str(slide),
        "--stain",
        "HER2",
        str(models["lora"]),
        str(models["flow"]),
        "--stain-model",
        str(models["stain_model"]),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--max-variants",
        str(N_MAX),
        "--prior",
        str(models["prior"]),
    ]


@pytest.fixture(scope="module")
def app_url(models, real_slide) -> str:
    with serve_app(server_args(models, real_slide)) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(
        app_url, verbose=False, httpx_kwargs={"timeout": 120}
    )  # patient: a loaded 2-core CI machine


#################################################################################
#                          Start-up: one line, no server                        #
#################################################################################


def test_missing_or_gated_models_are_one_line_before_the_server_starts(
    models, real_slide, tmp_path, monkeypatch, capsys
):
    import gradio as gr

    from tools.app import main

    def launch(*_, **__):
        raise AssertionError("the server started")

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    tiny = ["--model", str(models["model"]), "--vae", str(models["vae"]), "--uni", str(models["uni"])]
    cases = {  # the expected part of the message: argv
        "make demo": ["--demo", str(tmp_path / "no_demo")],
        "log in to the Hub": ["--model", "StonyBrook-CVLab/PixCell-256"],  # gated, and offline here
        "--uni": [*tiny[:4], "--uni", "hf-hub:MahmoodLab/UNI2-h"],
        "no such slide file": [*tiny, "--slide", str(tmp_path / "missing.svs")],
        "--stain HER2 (with --stain-model": [
            *tiny,
            "--stain-model",
            str(models["stain_model"]),
            "--stain",
            "HER2",
            str(tmp_path / "missing_lora.safetensors"),
            str(models["flow"]),
        ],
        "--stain-model StonyBrook-CVLab/PixCell-1024): cannot load": [
            *tiny,
            "--stain",
            "HER2",
            str(models["lora"]),
            str(models["flow"]),
        ],
        "without --model": ["--uni", str(models["uni"])],
    }
    for expected, argv in cases.items():
        assert run_cli(main, argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert expected in err, (expected, err)


def test_without_model_flags_it_serves_the_demo_and_says_so(models, real_slide, tmp_path):
    """`make app` after `make demo`: the demo's models and slide, from --demo (here a demo-shaped folder)."""
    from tools.app import build_parser, header, load_context

    demo = tmp_path / "demo_output"
    (demo / ".done").mkdir(parents=True)
    (demo / ".done" / "train.json").write_text("{}")
    (demo / ".done" / "slide.json").write_text(json.dumps({"info": {"slide": str(real_slide)}}))
    (demo / "standins").mkdir()
    (demo / "train").symlink_to(models["model"])
    (demo / "standins" / "vae-standin").symlink_to(models["vae"])
    (demo / "standins" / "uni2h-standin").symlink_to(models["uni"])
    ctx = load_context(build_parser().parse_args(["--demo", str(demo), "--device", "cpu"]))
    assert ctx.demo == str(demo) and ctx.sources["uni"] == str(demo / "standins" / "uni2h-standin")
    assert ctx.slide is not None and ctx.slide.path == real_slide and not ctx.stainers
    assert "**Demo models.**" in header(ctx) and "not PixCell, UNI2-h or the SD3.5 VAE" in header(ctx)
    assert ctx.prior is None  # no prior stage in this demo folder: no reference-free tab
    (demo / ".done" / "prior.json").write_text("{}")
    (demo / "prior").symlink_to(models["prior"])
    ctx = load_context(build_parser().parse_args(["--demo", str(demo), "--device", "cpu"]))
    assert ctx.prior is not None and ctx.prior.labels == ["tumour", "stroma"]


#################################################################################
#                                 API (gradio_client)                           #
#################################################################################


def test_api_reference_upload_checks(client, files):
    from gradio_client import handle_file

    def load(path: Path):
        return client.predict(handle_file(str(path)), api_name="/variants_load_reference")

    for name, message in [
        ("notes", "notes.txt: not an image file"),
        ("truncated", "truncated.png: damaged or truncated"),
        ("small", "small.png: 120x100 px is too small"),
    ]:
        image, source, status = load(files[name])
        assert image is None and source == "" and message in status, status
    image, source, status = load(files["large"])
    assert "Reference: the central 256x256 px of large.jpg, a 320x300 px image" in status
    assert Image.open(image).size == (256, 256)
    image, source, status = load(files["tile"])
    assert source == "upload: tile.png" and "Reference: tile.png" in status
    assert np.array_equal(np.asarray(Image.open(image).convert("RGB")), np.asarray(Image.open(files["tile"])))


def read_variant(path: str) -> tuple[np.ndarray, dict]:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.text["pixcell"])


def test_api_variants_seeds_cosine_and_downloads(client, files, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    tile = handle_file(str(files["tile"]))
    gallery, downloads, status = client.predict(
        tile, "upload: tile.png", 3, "dpm-solver", 4, 2.0, 5, api_name="/generate"
    )
    assert "3 variant(s)" in status and "seeds 5..7" in status
    assert [Path(f).name for f in downloads] == [
        "pixcell_variant_1_seed5.png",
        "pixcell_variant_2_seed6.png",
        "pixcell_variant_3_seed7.png",
        "pixcell_variants_settings.json",
    ]
    settings = json.loads(Path(downloads[-1]).read_text())
    assert [v["seed"] for v in settings["variants"]] == [5, 6, 7]
    assert (
        settings["steps"] == 4
        and settings["sampler"] == "dpm-solver"
        and settings["reference"] == "upload: tile.png"
    )
    images = []
    for item, path, row in zip(gallery, downloads, settings["variants"]):
        image, meta = read_variant(path)
        assert image.shape == (256, 256, 3) and meta["seed"] == row["seed"]
        assert -1 <= row["uni_cosine"] <= 1 and f"UNI cosine {row['uni_cosine']:.3f}" in item["caption"]
        images.append(image)
    assert not np.array_equal(images[0], images[1])  # own seeds, own noise
    # variant i is seed + i whatever the batch: seed 6 alone is the second variant above (up to float order)
    gallery, downloads, _ = client.predict(
        tile, "upload: tile.png", 1, "dpm-solver", 4, 2.0, 6, api_name="/generate"
    )
    again, _ = read_variant(downloads[0])
    assert np.abs(again.astype(int) - images[1].astype(int)).max() <= 1
    assert settings["strength"] == 1.0  # from noise, unless the strength slider says otherwise
    # img2img: the same seed from the noised reference at strength 0.3, recorded in the settings
    _, downloads, status = client.predict(
        tile, "upload: tile.png", 1, "dpm-solver", 4, 2.0, 6, 0.3, api_name="/generate"
    )
    assert "1 variant(s)" in status and json.loads(Path(downloads[-1]).read_text())["strength"] == 0.3
    assert not np.array_equal(read_variant(downloads[0])[0], again)
    # inpainting: a mask whose left half is black keeps the reference there (256 px model: the tile itself)
    half = np.zeros((256, 256), np.uint8)
    half[:, 128:] = 255
    Image.fromarray(half).save(tmp_path / "mask.png")
    _, downloads, status = client.predict(
        tile,
        "upload: tile.png",
        1,
        "dpm-solver",
        4,
        2.0,
        6,
        1.0,
        handle_file(str(tmp_path / "mask.png")),
        api_name="/generate",
    )
    painted, _ = read_variant(downloads[0])
    reference = np.asarray(Image.open(files["tile"]).convert("RGB"))
    assert json.loads(Path(downloads[-1]).read_text())["inpainting_mask"] is True
    assert np.abs(painted[:, :64].astype(int) - reference[:, :64]).max() <= 2  # kept, away from the border
    assert np.abs(painted[:, 192:].astype(int) - reference[:, 192:]).mean() > 5  # redrawn
    # the sampler and guidance controls reach the sampler (and the settings record them)
    _, downloads, _ = client.predict(tile, "", 1, "ddim", 4, 0.0, 6, api_name="/generate")
    other, meta = read_variant(downloads[0])
    assert meta["sampler"] == "ddim" and meta["guidance"] == 0.0 and not np.array_equal(other, images[1])
    # out of range: the slider refuses it (one line, no traceback)
    with pytest.raises(AppError, match=f"greater than maximum value {N_MAX}"):
        client.predict(tile, "", N_MAX + 1, "dpm-solver", 4, 2.0, 0, api_name="/generate")
    gallery, _, status = client.predict(None, "", 2, "dpm-solver", 4, 2.0, 0, api_name="/generate")
    assert gallery == [] and "Pick a tile" in status


def test_api_reference_free_images_from_the_prior(client):
    from gradio_client.exceptions import AppError

    gallery, downloads, status = client.predict("stroma", 2, 1.5, 3, 2.0, 7, api_name="/reference_free")
    assert "2 image(s) from the UNI prior (stroma)" in status and len(gallery) == 2
    settings = json.loads(Path(downloads[-1]).read_text())
    assert settings["label"] == "stroma" and settings["prior_guidance"] == 1.5 and settings["steps"] == 3
    assert settings["prior"] and settings["prior_ref"].startswith("sha256:")
    first, meta = read_variant(downloads[0])
    second, _ = read_variant(downloads[1])
    assert first.shape == (256, 256, 3) and meta["seed"] == 7 and not np.array_equal(first, second)
    _, again, _ = client.predict("stroma", 2, 1.5, 3, 2.0, 7, api_name="/reference_free")
    assert np.array_equal(
        read_variant(again[0])[0], first
    )  # the seed decides the prior's noise and the images'
    _, _, status = client.predict("", 1, 1.0, 3, 2.0, 0, api_name="/reference_free")
    assert "(any label)" in status
    with pytest.raises(AppError):  # not one of the dropdown's choices
        client.predict("bone", 1, 1.0, 3, 2.0, 0, api_name="/reference_free")


def test_a_students_recorded_sampler_is_where_the_controls_start(models):
    from diffusion.sampling.pipeline import PixCellPipeline
    from tools.app import tab_defaults

    pipe = PixCellPipeline.from_parts(models["model"], models["vae"])
    assert tab_defaults(pipe) == ("dpm-solver", 20, 2.0)  # the published defaults at 256 px
    pipe.defaults = {"sampler": "lcm", "steps": 4, "guidance": 3.0}  # what a student's sampling.json records
    assert tab_defaults(pipe) == ("lcm", 4, 3.0)


def test_api_staining(client, files):
    from gradio_client import handle_file

    image, downloads, status = client.predict(
        handle_file(str(files["tile1024"])), "upload: tile1024.png", "HER2", 2, 1.2, 0, api_name="/stain"
    )
    assert "HER2 in" in status
    stained, meta = read_variant(downloads[0])
    assert stained.shape == (128, 128, 3)  # the tiny T=16 model makes 128 px per 1024 px unit
    assert meta["stain"] == "HER2" and meta["flow_steps"] == 100 and "model_ref" not in meta
    assert meta["lora"].endswith("lora.safetensors") and meta["model"].endswith("transformer")
    image, downloads, status = client.predict(
        handle_file(str(files["tile"])), "", "HER2", 2, 1.2, 0, api_name="/stain"
    )
    assert image is None and "needs a 1024x1024 px" in status


def test_queue_runs_one_generation_at_a_time(app_url, files):
    """Two clients (two browser tabs) ask at once: the model runs one request, then the other."""
    from gradio_client import Client, handle_file

    tile = handle_file(str(files["tile"]))
    clients = [Client(app_url, verbose=False, httpx_kwargs={"timeout": 120}) for _ in range(2)]
    jobs = [
        c.submit(tile, "", 2, "dpm-solver", 25, 2.0, i, api_name="/generate") for i, c in enumerate(clients)
    ]
    submitted = datetime.now(timezone.utc)
    runs = []
    for job in jobs:
        _, downloads, status = job.result(timeout=180)
        assert "2 variant(s)" in status
        clock = json.loads(Path(downloads[-1]).read_text())
        runs.append((datetime.fromisoformat(clock["started"]), datetime.fromisoformat(clock["finished"])))
    (s1, e1), (s2, e2) = sorted(runs)
    assert submitted < e1, "the second request came after the first had finished: nothing to queue"
    assert e1 <= s2, f"two generations ran at once: {runs}"


#################################################################################
#                                  Real browser                                 #
#################################################################################


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = browser_missing()
    if reason:
        if IN_CI:  # CI installs the browser (.ci/run): a missing one there is a failure, not a skip
            pytest.fail(f"browser test in CI: {reason}")
        pytest.skip(reason)
    downloads = tmp_path_factory.mktemp("downloads")
    driver = chromium(downloads)
    driver.download_dir = downloads
    yield driver
    close_browser(driver)


def test_browser_upload_generate_download_click_and_bad_upload(browser, app_url, files, tmp_path):
    page = AppPage(browser, app_url)
    assert "PixCell" in page.find("#header").text
    # upload a real slide tile, generate N variants
    page.upload(files["tile"])
    page.wait_status("Reference: tile.png")
    page.set_number("variants-steps", 4)
    page.generate(N_MAX, timeout=120)
    assert len(page.gallery_images()) == N_MAX
    # the first download link gives a PNG that decodes, with its settings inside
    links = page.download_links()
    assert [a.get_attribute("download") for a in links][-1] == "pixcell_variants_settings.json"
    links[0].click()
    png = wait_download(browser.download_dir, links[0].get_attribute("download"))
    image, meta = read_variant(str(png))
    assert image.shape == (256, 256, 3) and meta["steps"] == 4 and meta["reference"] == "upload: tile.png"
    # a click on the slide thumbnail picks that tile as the reference (and frames it on the thumbnail)
    uploaded = page.find("#variants-reference img").get_attribute("src")
    thumbnail = page.find("#variants-thumbnail img").get_attribute("src")
    page.click_thumbnail(0.5, 0.5)
    source = wait_for(
        lambda: (
            "tile row" in page.find("#variants-source textarea").get_attribute("value")
            and page.find("#variants-source textarea").get_attribute("value")
        ),
        30,
        "a slide tile",
    )
    assert source.startswith("slide: cmu_small_region.svs, tile row ")
    wait_for(
        lambda: page.find("#variants-reference img").get_attribute("src") != uploaded, 30, "the tile shown"
    )
    assert page.find("#variants-thumbnail img").get_attribute("src") != thumbnail
    # a file that is not an image: a message on the page, no traceback
    page.upload(files["notes"])
    status = page.wait_status("not an image file")
    assert "notes.txt" in status and "Traceback" not in browser.page_source
    page.screenshot(tmp_path / "app.png")
    assert Image.open(tmp_path / "app.png").size[0] > 800
