"""img2img (SDEdit strength) and inpainting through PixCellPipeline: inpainting keeps the unmasked pixels within
the VAE round trip and changes the masked ones; strength 1 is plain generation; bad inputs are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.encoders import decode_latents, encode_posterior, latents_to_model
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.editing import latent_mask, noised, start_step
from diffusion.sampling.pipeline import PixCellPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_vae_dir, tmp_path_factory):
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-256").eval()  # 256 px: 32 x 32 latent px
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("tiny_t256")
    model.save_pretrained(folder)
    return PixCellPipeline.from_parts(folder, tiny_vae_dir)


def test_inpainting_keeps_the_unmasked_pixels_and_changes_the_masked_ones(pipe, slide_tiles):
    image = torch.from_numpy(slide_tiles[0][1].copy()).permute(2, 0, 1)[None].float() / 255  # a real H&E tile
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., :, :128] = 1  # regenerate the left half
    uni, gen = torch.randn(1, 1, 1536), torch.Generator().manual_seed(0)
    out = pipe(
        uni,
        image=image,
        mask_image=mask,
        strength=1.0,
        num_inference_steps=6,
        generator=gen,
        output_type="pt",
        progress=False,
    ).images
    with torch.no_grad():
        trip = decode_latents(pipe.vae, latents_to_model(encode_posterior(pipe.vae, image)[0], pipe.vae))
    kept, masked = (
        (..., slice(None), slice(176, 256)),
        (..., slice(None), slice(0, 96)),
    )  # away from the border
    # The latents outside the mask end as the image's own, so the decoded kept half is the VAE round trip of the
    # image (the output shows the image itself there, composited over the feathered mask); inside, new content.
    lat = pipe(
        uni,
        image=image,
        mask_image=mask,
        num_inference_steps=6,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        progress=False,
    ).images
    known = latents_to_model(encode_posterior(pipe.vae, image)[0], pipe.vae)
    keep = latent_mask(mask, (32, 32), feather=2) == 0
    assert torch.equal(lat[keep.expand_as(lat)], known[keep.expand_as(known)])
    assert torch.allclose(out[kept], image[kept])
    assert (out - trip)[masked].abs().mean() > 0.05 and (out - image)[masked].abs().mean() > 0.05
    # SDEdit: strength 1 without a mask is plain generation from the same noise; a low strength stays close.
    noise = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=6, output_type="pt", progress=False, latents=noise)
    plain = pipe(uni, **kw).images
    assert torch.allclose(pipe(uni, image=image, strength=1.0, **kw).images, plain)
    close = pipe(uni, image=image, strength=0.2, **kw).images
    assert (close - trip).abs().mean() < (plain - trip).abs().mean()


def test_editing_helpers_and_errors(pipe):
    assert [start_step(20, s) for s in (1.0, 0.5, 0.01)] == [0, 10, 19]
    x0, eps = torch.ones(3), torch.zeros(3)
    assert torch.equal(noised(x0, eps, None), x0) and noised(x0, eps, 999)[0] < 0.01 < noised(x0, eps, 0)[0]
    m = latent_mask(torch.ones(1, 1, 16, 16).tril(), (8, 8), feather=2)
    assert m.shape == (1, 1, 8, 8) and m.max() == 1 and 0 < m[m < 1].max() < 1
    uni = torch.randn(1, 1, 1536)
    with pytest.raises(ValueError, match="need an `image` to start from"):
        pipe(uni, strength=0.5, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="`strength` 1.5"):
        pipe(uni, image=torch.rand(1, 3, 256, 256), strength=1.5, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="image: \\(1, 3, 64, 64\\) for 1 images of 256 px"):
        pipe(uni, image=torch.rand(1, 3, 64, 64), num_inference_steps=2, progress=False)
    pipe.set_sampler("euler-ancestral")
    with pytest.raises(ValueError, match="img2img and inpainting take one of"):
        pipe(uni, image=np.zeros((256, 256, 3), np.uint8), num_inference_steps=2, progress=False)
    pipe.set_sampler("dpm-solver")
