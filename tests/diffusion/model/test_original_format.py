"""Original PixArt-style checkpoints: the published key layouts, the golden forward pass, lossless conversion."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffusion.model.loading import load_transformer, save_original_checkpoint
from diffusion.model.original_format import diffusers_to_original, infer_config, original_to_diffusers
from diffusion.model.pixcell_transformer import PixCellTransformer2DModel, build_pixcell
from diffusion.sampling.samplers import denoise, guided_prediction, make_scheduler, transformer_fn


def _golden(shared_dir, name):
    tensors = load_file(shared_dir / "golden" / f"original_tiny_{name}.safetensors")
    weights = {k[len("weights.") :]: v for k, v in tensors.items() if k.startswith("weights.")}
    meta = json.loads((shared_dir / "golden" / "golden.json").read_text())[f"tiny_{name}"]
    return tensors, weights, meta


@pytest.mark.parametrize("size", [256, 1024])
def test_key_map_matches_both_published_layouts(shared_dir, size):
    orig = json.loads((shared_dir / "formats" / f"pixcell_{size}_original_keys.json").read_text())[
        "state_dict"
    ]
    diff = json.loads((shared_dir / "formats" / f"pixcell_{size}_diffusers_keys.json").read_text())[
        "state_dict"
    ]
    fake = {k: torch.empty(v, device="meta") for k, v in orig.items()}
    mapped = original_to_diffusers(fake)
    assert {k: list(v.shape) for k, v in mapped.items()} == diff
    back = diffusers_to_original(mapped, pos_embed=fake["pos_embed"])
    assert {k: list(v.shape) for k, v in back.items()} == orig


@pytest.mark.parametrize("name", ["T1", "T16"])
def test_golden_forward_pass(shared_dir, name):
    tensors, weights, meta = _golden(shared_dir, name)
    cfg = infer_config(weights, head_dim=36)
    for key, value in meta["diffusers_equivalent_config"].items():
        if key in cfg:
            assert cfg[key] == value, key
    model = PixCellTransformer2DModel(**meta["diffusers_equivalent_config"]).eval()
    model.load_state_dict(original_to_diffusers(weights), strict=True)
    # The recomputed tables equal the stored ones.
    assert torch.allclose(model.pos_embed.pos_embed, weights["pos_embed"], atol=1e-6)
    if "y_pos_embed" in weights:
        fresh = PixCellTransformer2DModel(**meta["diffusers_equivalent_config"]).y_pos_embed.y_pos_embed
        assert torch.allclose(fresh, weights["y_pos_embed"], atol=1e-6)
    with torch.no_grad():
        out = model(tensors["input.x"], tensors["input.y"], tensors["input.t"]).sample
    ref = tensors["output.forward"]
    assert out.shape == ref.shape
    assert (out - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("name", ["T1", "T16"])
def test_golden_dpm_solver_run(shared_dir, name):
    tensors, weights, meta = _golden(shared_dir, name)
    model = PixCellTransformer2DModel(**meta["diffusers_equivalent_config"]).eval()
    model.load_state_dict(original_to_diffusers(weights), strict=True)
    fn = transformer_fn(model)
    cond = tensors["input.y"][:2]
    uncond = model.null_condition(2)
    with torch.no_grad():
        out = denoise(
            lambda x, t: guided_prediction(fn, x, t, cond, uncond, 2.0),
            tensors["input.dpm_noise"],
            make_scheduler("dpm-solver"),
            20,
            progress=False,
        )
    ref = tensors["output.dpm_latent_w2_20steps"]
    assert (out - ref).norm() / ref.norm() < 2e-3


def test_original_checkpoint_roundtrip_is_lossless(tmp_path):
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-128-T16").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    path = save_original_checkpoint(model, tmp_path / "model.pth", as_ema=True)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "state_dict_ema", "pixcell_config"}
    assert raw["state_dict"]["blocks.0.attn.qkv.weight"].shape == (216, 72)
    back = load_transformer(path)
    assert back.config.caption_num_tokens == 16 and back.config.interpolation_scale == 2.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x, y, t = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 1536), torch.tensor([1, 999])
    with torch.no_grad():
        assert torch.equal(model(x, y, t).sample, back(x, y, t).sample)


def test_ema_or_raw_weights_selectable(tmp_path):
    a = build_pixcell("PixCell-tiny-64")
    sd = diffusers_to_original(a.state_dict())
    ema = {k: v + 1.0 for k, v in sd.items()}
    torch.save({"state_dict": sd, "state_dict_ema": ema}, tmp_path / "both.pth")
    w_raw = load_transformer(tmp_path / "both.pth", ema=False).proj_out.bias
    w_ema = load_transformer(tmp_path / "both.pth", ema=True).proj_out.bias
    assert torch.equal(w_ema, w_raw + 1.0)


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    sd = diffusers_to_original(build_pixcell("PixCell-tiny-64").state_dict())
    torch.save({"state_dict": {**sd, "blocks.0.extra.weight": torch.zeros(1)}}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unknown keys: blocks.0.extra.weight"):
        load_transformer(tmp_path / "extra.pth")
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="trunc.pth: cannot be read"):
        load_transformer(tmp_path / "trunc.pth")
    torch.save({"optimizer": {}}, tmp_path / "noweights.pth")
    with pytest.raises(ValueError, match="no 'state_dict'"):
        load_transformer(tmp_path / "noweights.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_transformer(tmp_path / "missing.pth")
