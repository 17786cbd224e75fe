"""diffusion.sampling.variants: references from files and slide tiles, and N seeded variants with their UNI cosine."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.encoders import load_uni
from diffusion.metrics.distances import paired_cosine
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.samplers import sampler_name
from diffusion.sampling.variants import (
    ReferenceImageError,
    SlideTiles,
    embed_reference,
    fit_reference,
    make_variants,
    read_reference,
    reference_size,
)
from diffusion.standins import TINY_UNI_DIM, build_tiny_uni

C = TINY_UNI_DIM


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_vae_dir):
    """PixCell-tiny-64 (T = 1: a 256 px reference, 64 px images) and a UNI-shaped ViT whose features vary."""
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-64", caption_channels=C).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    pipe = PixCellPipeline.from_parts(model, tiny_vae_dir)
    uni_dir = build_tiny_uni(tmp_path_factory.mktemp("uni"), embed_dim=C, init_values=None)
    return pipe, load_uni(uni_dir)


def tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_fit_reference_keeps_crops_or_refuses():
    image = tissue(256, 256)
    ref = fit_reference(image, 256, "a.png")
    assert ref.note == "" and np.array_equal(ref.image, image)
    big = tissue(300, 400)
    ref = fit_reference(big, 256, "b.png")
    assert (
        np.array_equal(ref.image, big[22:278, 72:328])
        and "central 256x256 px of b.png, a 400x300" in ref.note
    )
    with pytest.raises(
        ReferenceImageError, match=r"c.png: 255x300 px is too small; this model needs a 256x256"
    ):
        fit_reference(tissue(300, 255), 256, "c.png")


def test_read_reference_names_the_upload_and_the_problem(tmp_path):
    png = io.BytesIO()
    Image.fromarray(tissue(256, 256)).save(png, format="PNG")
    (tmp_path / "ok.png").write_bytes(png.getvalue())
    assert read_reference(tmp_path / "ok.png", 256).image.shape == (256, 256, 3)
    (tmp_path / "cut.png").write_bytes(png.getvalue()[:3000])
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases = {
        "cut.png": "shown.png: damaged or truncated image",
        "text.png": "shown.png: not an image file",
        "empty.jpg": "shown.png: not an image file",
    }
    for name, message in cases.items():
        with pytest.raises(ReferenceImageError, match=message) as err:
            read_reference(tmp_path / name, 256, name="shown.png")
        assert str(tmp_path) not in str(err.value)  # the temporary upload path never reaches the page


def test_slide_tiles_pick_the_extraction_grid(real_slide):
    import openslide

    tiles = SlideTiles(real_slide, 256, thumb_side=400)
    rows, cols = tiles.shape
    width, height = openslide.OpenSlide(str(real_slide)).dimensions
    assert (rows, cols) == (height // 256, width // 256)  # 0.499 um/px is read 1:1 as 20x
    assert max(tiles.thumbnail.size) == 400
    step = 256 * tiles.scale
    assert tiles.cell_at(2.5 * step, 1.5 * step) == (1, 2)
    assert tiles.cell_at(-1, 0) is None and tiles.cell_at(0, rows * step + 1) is None
    tile = tiles.tile(1, 2)
    direct = openslide.OpenSlide(str(real_slide)).read_region((512, 256), 0, (256, 256)).convert("RGB")
    assert tile.image.shape == (256, 256, 3) and np.array_equal(tile.image, np.asarray(direct))
    assert (tile.x, tile.y) == (512, 256) and "tile row 1 col 2" in tile.describe("s.svs")
    framed = np.asarray(tiles.draw((1, 2)))
    assert tuple(framed[round(1.5 * step), round(2 * step) + 1]) == (0, 160, 255)  # the selected tile's frame


def test_variants_are_seeded_one_by_one_with_their_uni_cosine(parts):
    pipe, uni = parts
    assert reference_size(pipe) == 256
    ref = tissue(256, 256, seed=3)
    out = make_variants(pipe, uni, ref, n=3, steps=3, seed=10, progress=False)
    assert out.seeds == [10, 11, 12] and out.steps == 3 and out.guidance == 2.0  # published default at T = 1
    assert len(out.images) == 3 and out.images[0].shape == (64, 64, 3) and out.images[0].dtype == np.uint8
    assert not np.array_equal(out.images[0], out.images[1])
    # variant i depends on seed + i only, not on the batch it ran in
    alone = make_variants(pipe, uni, ref, n=1, steps=3, seed=11, progress=False)
    assert np.abs(alone.images[0].astype(int) - out.images[1].astype(int)).max() <= 1
    # the cosine is the paired UNI cosine of each variant (resized to the reference's 256 px) with the reference
    tokens = embed_reference(uni, torch.from_numpy(ref).permute(2, 0, 1)[None], 256)[0].numpy()
    syn = embed_reference(uni, torch.from_numpy(np.stack(out.images)).permute(0, 3, 1, 2), 256).numpy()
    expected = [float(paired_cosine(tokens, s).mean()) for s in syn]
    assert np.allclose(out.cosine, expected, atol=2e-3) and np.allclose(out.reference_tokens, tokens)
    assert len(set(np.round(out.cosine, 4))) == 3 and all(-1 <= c <= 1 for c in out.cosine)
    # another sampler is switched to; bad requests are one-line errors
    make_variants(pipe, uni, ref, n=1, sampler="ddim", steps=2, progress=False)
    assert sampler_name(pipe.scheduler) == "ddim"
    with pytest.raises(ValueError, match=r"reference: expected a \(256, 256, 3\) uint8 image"):
        make_variants(pipe, uni, ref[:128], n=1, progress=False)
    with pytest.raises(ValueError, match="at least 1 variant"):
        make_variants(pipe, uni, ref, n=0, progress=False)


def test_variants_of_a_1024_px_reference_use_its_16_tiles(parts, tiny_vae_dir):
    """The PixCell-1024 token layout (T = 16): a 1024 px reference, 16 UNI tokens, cosine averaged over them."""
    _, uni = parts
    torch.manual_seed(1)
    model = build_pixcell("PixCell-tiny-128-T16", caption_channels=C).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    pipe = PixCellPipeline.from_parts(model, tiny_vae_dir)
    assert reference_size(pipe) == 1024
    ref = tissue(1024, 1024, seed=4)
    out = make_variants(pipe, uni, ref, n=2, steps=2, seed=0, progress=False)
    assert out.reference_tokens.shape == (16, C) and out.guidance == 1.2  # the published default at T = 16
    syn = embed_reference(uni, torch.from_numpy(out.images[0]).permute(2, 0, 1)[None], 1024)[0].numpy()
    assert np.isclose(out.cosine[0], paired_cosine(out.reference_tokens, syn).mean(), atol=2e-3)


def test_variants_with_a_low_strength_keep_the_reference(parts):
    """img2img (SDEdit): the lower the strength, the closer the variants stay to the reference's VAE round trip
    (the same seeds at 0.1, 0.5 and 1, where 1 is drawn from noise); the strength is range-checked."""
    from diffusion.encoders import decode_latents, encode_posterior, latents_to_model

    pipe, uni = parts
    ref = tissue(256, 256, seed=5)
    pixels = torch.nn.functional.interpolate(
        torch.from_numpy(ref).permute(2, 0, 1)[None].float() / 255,
        size=(pipe.image_size,) * 2,
        mode="bilinear",
        antialias=True,
    )
    with torch.no_grad():
        z = latents_to_model(encode_posterior(pipe.vae, pixels)[0], pipe.vae)
        recon = decode_latents(pipe.vae, z)[0].permute(1, 2, 0).numpy() * 255

    def distance(out: object) -> float:
        return float(np.mean([np.abs(im.astype(float) - recon).mean() for im in out.images]))

    d = {
        s: distance(make_variants(pipe, uni, ref, n=2, steps=10, seed=3, progress=False, strength=s))
        for s in (0.1, 0.5, 1.0)
    }
    # the tiny model's predictions are random, so even a short denoise moves far: only the ordering is its own
    assert d[0.1] < d[0.5] < d[1.0] and d[0.1] < 0.8 * d[1.0]
    kept = make_variants(pipe, uni, ref, n=2, steps=10, seed=3, progress=False, strength=0.1)
    assert not np.array_equal(kept.images[0], kept.images[1])  # each variant still has its own noise
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength: expected 0 < strength <= 1"):
            make_variants(pipe, uni, ref, n=1, steps=2, progress=False, strength=bad)


def test_variants_with_a_mask_redraw_only_its_white_part(parts):
    """Inpainting: outside the mask (left half black) every variant shows the reference's own pixels at the
    model's size; inside (right half white) it is redrawn; a mask of another size is one line."""
    pipe, uni = parts
    ref = tissue(256, 256, seed=6)
    mask = np.zeros((256, 256), np.uint8)
    mask[:, 128:] = 255
    out = make_variants(pipe, uni, ref, n=2, steps=4, seed=1, progress=False, mask=mask)
    small = torch.nn.functional.interpolate(
        torch.from_numpy(ref).permute(2, 0, 1)[None].float(), size=(64, 64), mode="bilinear", antialias=True
    )[0].permute(1, 2, 0)
    for image in out.images:
        # the border is blended over the mask's feather (2 latent px each side: 16 px of these 64): look past it
        kept = np.abs(image[:, :12].astype(float) - small[:, :12].numpy())
        redrawn = np.abs(image[:, 52:].astype(float) - small[:, 52:].numpy())
        assert kept.max() <= 2 and redrawn.mean() > 10 * max(kept.mean(), 0.1)
    with pytest.raises(ValueError, match=r"mask: expected a \(256, 256\) image"):
        make_variants(pipe, uni, ref, n=1, steps=2, progress=False, mask=mask[:128])
