"""The cell-mask ControlNet: published layout, zero init, strict loading, the pipeline, masks, and a toy task
on which the mask must come to control the output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusion.data.mask_pairs import MaskPairDataset, masks_to_tensor, read_mask, render_mask
from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.model.controlnet import PixCellControlNet, controlled_forward, load_controlnet
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.controlnet_pipeline import PixCellControlNetPipeline


def random_base(preset: str = "PixCell-tiny-64", seed: int = 0, **overrides):
    """A tiny transformer with every weight random (the default init zeroes the output head)."""
    torch.manual_seed(seed)
    model = build_pixcell(preset, **overrides).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


# --------------------------------------------------------------------------- layout and loading


def test_full_size_layout_matches_published_keys(shared_dir):
    spec = json.loads((shared_dir / "formats" / "pixcell_256_controlnet_keys.json").read_text())
    config = {k: v for k, v in spec["config"].items() if not k.startswith("_")}
    with torch.device("meta"):
        model = PixCellControlNet(**config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == spec["state_dict"]
    assert model.num_blocks == 27 and len(model.controlnet_blocks) == 27


def test_zero_init_leaves_the_base_output_unchanged():
    base = random_base()
    controlnet = PixCellControlNet.from_transformer(base, n_controlnet_blocks=2)
    x, mask = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    uni, t = torch.randn(3, 1, 1536), torch.tensor([0, 400, 999])
    with torch.no_grad():
        plain = base(x, uni, t).sample
        controlled = controlled_forward(base, controlnet, x, mask, uni, t, conditioning_scale=3.0)
        residuals = controlnet(x, mask, uni, t).controlnet_block_samples
    assert torch.equal(plain, controlled)
    assert len(residuals) == 2 and all(r.shape == (3, 16, 72) and not r.any() for r in residuals)
    # The copied blocks are the base's first blocks, and the residuals reach the base output once non-zero.
    assert torch.equal(
        controlnet.transformer_blocks[1].ff.net[2].weight, base.transformer_blocks[1].ff.net[2].weight
    )
    torch.nn.init.normal_(controlnet.controlnet_blocks[0].weight, std=0.1)
    with torch.no_grad():
        assert not torch.allclose(controlled_forward(base, controlnet, x, mask, uni, t), plain)
        zero_scale = controlled_forward(base, controlnet, x, mask, uni, t, conditioning_scale=0.0)
    assert torch.equal(zero_scale, plain)


def test_published_layout_weights_load_strictly(tmp_path):
    """A folder written like the published controlnet/ (config with _class_name, safetensors) loads strictly."""
    torch.manual_seed(1)
    source = PixCellControlNet.from_transformer(random_base(), n_controlnet_blocks=1)
    for p in source.parameters():
        p.data.normal_(0, 0.1)
    folder = tmp_path / "repo" / "controlnet"
    folder.mkdir(parents=True)
    config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    config.update({"_class_name": "PixCellControlNet", "_diffusers_version": "0.32.0"})
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()},
        folder / "diffusion_pytorch_model.safetensors",
    )

    loaded = load_controlnet(tmp_path / "repo")  # a pipeline folder: finds controlnet/
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    sd = dict(source.state_dict())
    sd.pop("controlnet_blocks.0.bias")
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="controlnet_blocks.0.bias"):
        load_controlnet(folder)
    sd = dict(source.state_dict())
    sd["controlnet_blocks.1.weight"] = torch.zeros(72, 72)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="controlnet_blocks.1.weight"):
        load_controlnet(folder)
    with pytest.raises(FileNotFoundError, match="no ControlNet here"):
        load_controlnet(tmp_path)


def test_save_pretrained_round_trip(tmp_path):
    source = PixCellControlNet.from_transformer(random_base(), n_controlnet_blocks=2)
    torch.nn.init.normal_(source.cond_pos_embed.proj.weight)
    source.save_pretrained(tmp_path / "cn")
    loaded = PixCellControlNet.from_pretrained(tmp_path / "cn")
    assert loaded.config.n_controlnet_blocks == 2
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_published_training_recipe_config():
    from diffusion.config import load_config
    from train_scripts.train_controlnet import SCHEMA

    cfg = load_config("configs/controlnet/pixcell_256_cell.py", schema_file=SCHEMA)
    assert cfg.base_model == "StonyBrook-CVLab/PixCell-256" and cfg.controlnet.n_blocks == 27
    assert cfg.optimizer.type == "AdamW" and cfg.optimizer.lr == 1e-5 and cfg.gradient_clip == 1.0
    assert cfg.lr_schedule.type == "cosine" and cfg.lr_schedule.warmup_steps == 500
    assert cfg.max_steps == 25000 and cfg.train_batch_size == 4 and cfg.controlnet.freeze_patch_embed
    with pytest.raises(ValueError, match="unknown config key controlnet.'n_block'"):
        load_config("configs/controlnet/tiny.py", {"controlnet.n_block": 3}, schema_file=SCHEMA)


# --------------------------------------------------------------------------- masks


def test_mask_rendering_binary_instance_and_gray_rgb(tmp_path):
    labels = np.zeros((64, 64), dtype=np.uint16)
    labels[10:20, 10:20] = 1
    labels[30:40, 5:15] = 257  # instance ids beyond 8 bits
    rendered = render_mask(labels)
    assert rendered.shape == (3, 64, 64) and set(rendered.unique().tolist()) == {0.0, 1.0}
    assert rendered[:, 35, 10].tolist() == [1, 1, 1] and rendered[:, 0, 0].tolist() == [0, 0, 0]

    Image.fromarray(labels).save(tmp_path / "instance.png")  # 16-bit instance ids (mode I;16)
    Image.fromarray(((labels > 0) * 255).astype(np.uint8)).save(tmp_path / "binary.png")  # mode L
    gray = np.repeat(((labels > 0) * 255).astype(np.uint8)[..., None], 3, -1)
    Image.fromarray(gray).save(tmp_path / "rgb.png")
    pal = Image.fromarray((labels > 0).astype(np.uint8) * 3, mode="L").convert("P")
    pal.save(tmp_path / "palette.png")
    for name in ("instance", "binary", "rgb", "palette"):
        assert torch.equal(read_mask(tmp_path / f"{name}.png", 64), rendered), name


def test_bad_masks_give_clear_errors(tmp_path):
    colour = np.zeros((64, 64, 3), dtype=np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(np.zeros((64, 64, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(np.zeros((32, 64), dtype=np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"colour.png: colour RGB image"):
        read_mask(tmp_path / "colour.png", 64)
    with pytest.raises(ValueError, match=r"rgba.png: mask mode RGBA \(4 channels\)"):
        read_mask(tmp_path / "rgba.png", 64)
    with pytest.raises(ValueError, match=r"small.png: mask is 64x32 px, expected 64x64"):
        read_mask(tmp_path / "small.png", 64)
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        read_mask(tmp_path / "broken.png", 64)
    with pytest.raises(FileNotFoundError, match="missing.png: mask not found"):
        read_mask(tmp_path / "missing.png", 64)
    with pytest.raises(ValueError, match=r"mask 0: mask is 32x32 px, expected 64x64"):
        masks_to_tensor(np.zeros((32, 32), dtype=np.uint8), 64)
    with pytest.raises(ValueError, match=r"mask 0: mask of shape \(64, 64, 2\)"):
        masks_to_tensor([np.zeros((64, 64, 2))], 64)


def _write_pairs(root, n, size=256, uni_dim=96, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            root / "images" / f"p{i}.png"
        )
        labels = np.zeros((size, size), dtype=np.uint8)
        labels[rng.integers(0, size // 2) :][:, : rng.integers(1, size)] = i + 1
        Image.fromarray(labels).save(root / "masks" / f"p{i}.png")
        np.save(root / "images" / f"p{i}_uni.npy", rng.standard_normal((1, uni_dim)).astype(np.float16))


def test_pair_dataset_reads_and_skips_bad_pairs(tmp_path, caplog):
    _write_pairs(tmp_path, 4)
    ds = MaskPairDataset(tmp_path / "images", tmp_path / "masks", size=256, uni_dim=96)
    item = ds[0]
    assert len(ds) == 4 and item["image"].shape == (3, 256, 256) and item["uni"].shape == (1, 96)
    assert torch.equal(item["mask"], read_mask(tmp_path / "masks" / "p0.png"))
    # One mask of the wrong size, one UNI file missing: skipped with a count while under the allowed rate...
    Image.fromarray(np.zeros((128, 128), dtype=np.uint8)).save(tmp_path / "masks" / "p1.png")
    (tmp_path / "images" / "p2_uni.npy").unlink()
    ds = MaskPairDataset(tmp_path / "images", tmp_path / "masks", size=256, uni_dim=96, max_failure_rate=0.5)
    assert [n for _, n in enumerate(i[0].name for i in ds.items)] == ["p0.png", "p3.png"]
    assert "2 of 3 pairs skipped so far" in caplog.text
    # ...and a hard stop past it, naming the file.
    with pytest.raises(ValueError, match=r"2 of 4 .* pairs are bad .*p2_uni.npy"):
        MaskPairDataset(tmp_path / "images", tmp_path / "masks", size=256, uni_dim=96, max_failure_rate=0.3)


# --------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def tiny_controlnet_pipe(tiny_vae_dir):
    base = random_base()
    controlnet = PixCellControlNet.from_transformer(base, n_controlnet_blocks=2)
    for p in controlnet.parameters():
        p.data.normal_(0, 0.05)
    return PixCellControlNetPipeline.from_parts(base, controlnet, tiny_vae_dir)


def test_pipeline_mask_changes_samples_and_scale_zero_is_the_base(tiny_controlnet_pipe, tiny_vae_dir):
    from diffusion.sampling.pipeline import PixCellPipeline

    pipe = tiny_controlnet_pipe
    uni, latents = torch.randn(2, 1, 1536), torch.randn(2, 16, 8, 8)
    empty, full = np.zeros((64, 64), dtype=np.uint8), np.ones((64, 64), dtype=np.uint8)
    kw = dict(num_inference_steps=3, latents=latents, output_type="latent", progress=False)
    a = pipe(uni, mask=[empty, full], **kw).images
    b = pipe(uni, mask=[full, full], **kw).images
    assert a.shape == (2, 16, 8, 8)
    assert torch.equal(a[1], b[1]) and not torch.allclose(a[0], b[0])  # each row follows its own mask
    base_only = PixCellPipeline.from_parts(pipe.transformer, tiny_vae_dir)(uni, **kw).images
    zero = pipe(uni, mask=full, controlnet_conditioning_scale=0.0, **kw).images
    assert torch.allclose(zero, base_only, atol=1e-6)
    pil = pipe(uni[:1], mask=Image.fromarray(full * 255), num_inference_steps=2, progress=False).images
    assert pil[0].size == (64, 64)


def test_pipeline_bad_inputs(tiny_controlnet_pipe):
    pipe = tiny_controlnet_pipe
    uni = torch.randn(2, 1, 1536)
    with pytest.raises(ValueError, match="mask: required"):
        pipe(uni, num_inference_steps=2)
    with pytest.raises(ValueError, match="3 masks for 2 UNI embeddings"):
        pipe(uni, mask=[np.zeros((64, 64))] * 3, num_inference_steps=2)
    with pytest.raises(ValueError, match="expected 64x64"):
        pipe(uni, mask=np.zeros((256, 256)), num_inference_steps=2)
    with pytest.raises(ValueError, match="does not fit the transformer"):
        other = PixCellControlNet.from_transformer(random_base("PixCell-tiny-256"), 1)
        PixCellControlNetPipeline.from_parts(pipe.transformer, other, pipe.vae)


# --------------------------------------------------------------------------- the mask controls the output


def _square_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent 8x8 toy: the mask picks one of 4 quadrants; the target latent is bright there, dark elsewhere."""
    quadrant = torch.randint(0, 4, (n,), generator=generator)
    onehot = torch.zeros(n, 1, 8, 8)
    for i, q in enumerate(quadrant.tolist()):
        r, c = divmod(q, 2)
        onehot[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 1
    x0 = (onehot * 2 - 1).expand(-1, 16, -1, -1).contiguous()  # bright square in the chosen quadrant
    mask_latents = (
        (onehot * 2 - 1).expand(-1, 16, -1, -1).contiguous()
    )  # stands in for the VAE latent of the mask
    return quadrant, x0, mask_latents


def _x0_quadrant_accuracy(base, controlnet, diffusion, masks_shift: int = 0, t_value: int = 900) -> float:
    """How often the x0 the model predicts from a very noisy latent (t = 900, where the noise hides the square)
    is brightest in the quadrant of the square; with masks_shift > 0 each row gets another row's mask."""
    quadrant, x0, mask_latents = _square_task(64, torch.Generator().manual_seed(3))
    t = torch.full((64,), t_value)
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        eps = controlled_forward(
            base, controlnet, x_t, mask_latents.roll(masks_shift, 0), base.null_condition(64), t
        )
    x0_pred = diffusion.predict_x0(x_t, t, eps[:, :16])
    means = x0_pred.mean(1).unfold(1, 4, 4).unfold(2, 4, 4).mean((-1, -2)).flatten(1)  # (B, 4) quadrant means
    return (means.argmax(1) == quadrant).float().mean().item()


def test_training_makes_the_mask_control_the_output(one_thread):
    """Base trained on 'a bright square somewhere'; the ControlNet learns where, from the mask alone.

    The ControlNet trains on the noisier half of the timesteps, where the layout is decided (at low noise the
    latent itself shows the square); the objective is the published one, eps MSE.
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    diffusion = GaussianDiffusion()
    base = build_pixcell("PixCell-tiny-64")
    opt = torch.optim.AdamW(base.parameters(), lr=1e-3)
    for _ in range(100):
        _, x0, _ = _square_task(16, gen)
        t = torch.randint(0, 1000, (16,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        eps = base(diffusion.q_sample(x0, t, noise), base.null_condition(16), t).sample[:, :16]
        loss = ((eps - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    base.requires_grad_(False).eval()

    controlnet = PixCellControlNet.from_transformer(base, n_controlnet_blocks=2)
    before = _x0_quadrant_accuracy(base, controlnet, diffusion)
    opt = torch.optim.AdamW([p for p in controlnet.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(120):
        _, x0, mask_latents = _square_task(16, gen)
        t = torch.randint(500, 1000, (16,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = diffusion.q_sample(x0, t, noise)
        eps = controlled_forward(base, controlnet, x_t, mask_latents, base.null_condition(16), t)[:, :16]
        loss = ((eps - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    controlnet.eval()
    right = _x0_quadrant_accuracy(base, controlnet, diffusion)
    wrong = _x0_quadrant_accuracy(base, controlnet, diffusion, masks_shift=1)
    print(
        f"x0 quadrant accuracy: before {before:.2f}, after {right:.2f} (with other rows' masks {wrong:.2f})"
    )
    assert before < 0.45  # zero init: no mask control, about chance (0.25)
    assert right >= 0.6 and right - wrong >= 0.25  # the mask, not the noisy latent, decides the layout
