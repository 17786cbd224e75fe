"""The transformer: published layouts at full size, strict round trips, dtypes, conditions, checkpointing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffusion.model.pixcell_transformer import (
    PIXCELL_MODELS,
    PixCellTransformer2DModel,
    build_pixcell,
    sincos_2d,
)


@pytest.mark.parametrize("size", [256, 1024])
def test_full_size_matches_published_diffusers_layout(shared_dir, size):
    manifest = json.loads((shared_dir / "formats" / f"pixcell_{size}_diffusers_keys.json").read_text())
    with torch.device("meta"):
        model = PixCellTransformer2DModel(
            **{k: v for k, v in manifest["config"].items() if not k.startswith("_")}
        )
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == manifest["state_dict"]
    # The preset builds the same model.
    with torch.device("meta"):
        preset = build_pixcell(f"PixCell-XL/2-{size}")
    assert {k: list(v.shape) for k, v in preset.state_dict().items()} == manifest["state_dict"]
    for key in ("sample_size", "interpolation_scale", "caption_num_tokens", "num_layers"):
        assert preset.config[key] == manifest["config"][key]


def test_save_load_roundtrip_is_strict_and_exact(tmp_path):
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-128-T16").eval()
    for p in model.parameters():  # zero-initialised heads would hide a wrong load
        p.data.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "m")
    loaded = PixCellTransformer2DModel.from_pretrained(tmp_path / "m").eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x, y, t = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 1536), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(model(x, y, t).sample, loaded(x, y, t).sample)

    # Another size under the same config: one clear error.
    other = build_pixcell("PixCell-tiny-128-T16", num_layers=3)
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "m" / "config.json", tmp_path / "other" / "config.json")
    with pytest.raises(ValueError, match="does not match the model.*unexpected_keys: transformer_blocks.2"):
        PixCellTransformer2DModel.from_pretrained(tmp_path / "other")
    wide = build_pixcell("PixCell-tiny-128-T16", num_attention_heads=3, cross_attention_dim=108)
    wide.save_pretrained(tmp_path / "wide")
    shutil.copy(tmp_path / "m" / "config.json", tmp_path / "wide" / "config.json")
    with pytest.raises(ValueError, match="does not match its config"):
        PixCellTransformer2DModel.from_pretrained(tmp_path / "wide")


def test_token_position_embedding_only_for_several_tokens():
    assert build_pixcell("PixCell-tiny-64").y_pos_embed is None
    model = build_pixcell("PixCell-tiny-128-T16")
    table = model.y_pos_embed.y_pos_embed[0]
    assert table.shape == (16, 1536)
    assert len({tuple(r.tolist()) for r in table}) == 16  # every tile position distinct
    # Published formula: base = sample_size // patch, interpolation 2, phase base // T.
    assert torch.equal(table, sincos_2d(1536, 4, 8, 2.0, phase=8 // 16))


def test_sincos_equals_diffusers_patch_table():
    model = build_pixcell("PixCell-tiny-256")
    assert torch.allclose(model.pos_embed.pos_embed[0], sincos_2d(72, 16, 16, 0.5), atol=1e-6)


def test_condition_checks_and_null_condition():
    model = build_pixcell("PixCell-tiny-128-T16")
    model.check_condition(torch.randn(2, 16, 1536))
    with pytest.raises(ValueError, match=r"expected shape \(batch, 16, 1536\).*got \(2, 1, 1536\)"):
        model.check_condition(torch.randn(2, 1, 1536))
    with pytest.raises(ValueError, match=r"got \(2, 16, 768\)"):
        model.check_condition(torch.randn(2, 16, 768))
    bad = torch.randn(1, 16, 1536)
    bad[0, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.check_condition(bad)
    uni = torch.randn(3, 16, 1536)
    dropped = model.drop_condition(uni, torch.tensor([True, False, True]))
    assert torch.equal(dropped[1], uni[1])
    assert torch.equal(dropped[0], model.caption_projection.uncond_embedding)
    assert torch.equal(dropped[2], model.caption_projection.uncond_embedding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_in_each_dtype(dtype):
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-64").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, y, t = torch.randn(2, 16, 8, 8), torch.randn(2, 1, 1536), torch.tensor([3, 900])
    with torch.no_grad():
        ref = model(x, y, t).sample
        out = model.to(dtype)(x.to(dtype), y.to(dtype), t).sample
    assert out.dtype == dtype and out.shape == (2, 32, 8, 8)
    assert torch.isfinite(out.float()).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-64")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, y, t = torch.randn(2, 16, 8, 8), torch.randn(2, 1, 1536), torch.tensor([3, 900])

    def grads():
        model.zero_grad()
        model(x, y, t).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        assert torch.allclose(a, b, atol=1e-6)


def test_presets_are_plain_dicts():
    assert {"PixCell-XL/2-256", "PixCell-XL/2-512", "PixCell-XL/2-1024"} <= set(PIXCELL_MODELS)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_pixcell("PixCell-XXL")
