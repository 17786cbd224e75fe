"""virtual_staining: the flow MLP (published layout, learns a known map), LoRA set-up and its weights on disk."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion.model.flow_mlp import (
    TIME_SCALE,
    FlowMLP,
    flow_matching_loss,
    load_flow_mlp,
    save_flow_mlp,
    timestep_embedding,
    translation_metrics,
)
from diffusion.model.lora import (
    LoRASettings,
    add_lora,
    load_lora_weights,
    lora_delta_norm,
    lora_parameters,
    lora_state_dict,
    read_lora_settings,
    save_lora_weights,
)
from diffusion.standins import TINY_FLOW, build_tiny_transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models

# ---------------------------------------------------------------------- flow MLP


def test_default_flow_mlp_has_the_published_state_dict_layout(shared_dir):
    spec = json.loads((shared_dir / "formats" / "flow_mlp_keys.json").read_text())
    with torch.device("meta"):
        model = FlowMLP()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == spec["state_dict"]  # same keys, same shapes, nothing extra
    arch = spec["architecture"]
    assert (
        model.config.in_channels == arch["in_channels"]
        and model.config.num_res_blocks == arch["num_res_blocks"]
    )


def test_published_style_pth_loads_strictly_and_wrong_files_fail(tmp_path):
    torch.manual_seed(0)
    model = FlowMLP(**TINY_FLOW)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    torch.save(model.state_dict(), tmp_path / "mist_her2_mlp.pth")  # how the published files are stored
    loaded = load_flow_mlp(tmp_path / "mist_her2_mlp.pth")
    assert loaded.config == model.config
    x, t = torch.randn(5, 96), torch.rand(5) * TIME_SCALE
    assert torch.equal(loaded(x, t), model(x, t))
    # our own safetensors round trip
    save_flow_mlp(model, tmp_path / "flow.safetensors")
    assert torch.equal(load_flow_mlp(tmp_path / "flow.safetensors")(x, t), model(x, t))
    # an extra key, a missing key, a file that is no flow MLP
    sd = model.state_dict()
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected keys: extra.weight"):
        load_flow_mlp(tmp_path / "extra.pth")
    torch.save({k: v for k, v in sd.items() if k != "out.0.bias"}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing keys: out.0.bias"):
        load_flow_mlp(tmp_path / "missing.pth")
    torch.save({"a": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not a flow-MLP state dict"):
        load_flow_mlp(tmp_path / "foreign.pth")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_flow_mlp(tmp_path / "nothere.pth")


def test_fresh_flow_is_the_identity_and_timestep_embedding_is_cos_then_sin():
    model = FlowMLP(**TINY_FLOW)  # zero-initialised output head: v = 0
    x = torch.randn(4, 16, 96)
    assert torch.equal(model.translate(x, steps=3), x)
    emb = timestep_embedding(torch.tensor([0.0, 999.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(999.0)))


def test_flow_mlp_learns_an_affine_map_between_gaussian_clouds():
    """Rectified flow between x ~ N(0, I) and y = A x + b with A symmetric positive definite: the straight
    paths never cross, so the learned flow should reproduce the map; identity error is the baseline."""
    torch.manual_seed(0)
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d))
    a = q @ torch.diag(torch.linspace(0.5, 2.0, d)) @ q.T
    b = torch.full((d,), 2.0)
    model = FlowMLP(
        in_channels=d,
        out_channels=d,
        model_channels=64,
        time_embed_dim=64,
        bottleneck_channels=64,
        num_res_blocks=2,
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    for _ in range(400):
        x = torch.randn(256, d)
        loss = flow_matching_loss(model, x, x @ a.T + b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    x = torch.randn(2000, 1, d)
    m = translation_metrics(model, x, x @ a.T + b, steps=50)
    assert m["mse"] < 0.01 * m["identity_mse"], m
    assert m["cosine"] > 0.99 > m["identity_cosine"]


def test_translate_rejects_bad_embeddings():
    model = FlowMLP(**TINY_FLOW)
    with pytest.raises(ValueError, match="expects 96-d UNI tokens"):
        model.translate(torch.randn(1, 16, 1536))
    bad = torch.randn(1, 16, 96)
    bad[0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.translate(bad)
    with pytest.raises(ValueError, match="flow steps"):
        model.translate(torch.randn(1, 16, 96), steps=0)


# ---------------------------------------------------------------------- LoRA


@pytest.fixture()
def tiny_transformer():
    return build_tiny_transformer(seed=0)


def test_only_lora_parameters_train(tiny_transformer):
    model = add_lora(tiny_transformer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    targets = {n.split(".lora_")[0] for n in trainable}
    assert targets == {
        f"transformer_blocks.{i}.attn2.{m}" for i in range(2) for m in ("to_q", "to_k", "to_v", "to_out.0")
    }
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for p in lora_parameters(model))  # rank 4
    assert lora_delta_norm(model) == 0.0  # B starts at zero: the adapted model is the base model

    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, uni, t = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 96), torch.tensor([10, 500])
    for _ in range(2):
        out = model(x, encoder_hidden_states=uni, timestep=t).sample
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())  # base untouched
    assert lora_delta_norm(model) > 0  # adapter moved
    with pytest.raises(ValueError, match="already has a LoRA"):
        add_lora(model)


def test_lora_weights_save_only_the_adapter_and_load_back(tiny_transformer, tmp_path):
    model = add_lora(tiny_transformer, LoRASettings(rank=4, alpha=4))
    for p in lora_parameters(model):
        p.data.normal_(0, 0.1)
    path = save_lora_weights(model, tmp_path / "lora.safetensors")
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert all(
        k.startswith("transformer.transformer_blocks.") and ".lora_" in k and ".default" not in k
        for k in saved
    )
    assert len(saved) == len(lora_parameters(model)) == 16
    assert read_lora_settings(path) == LoRASettings(rank=4, alpha=4.0)

    fresh = add_lora(build_tiny_transformer(seed=0), read_lora_settings(path))
    assert load_lora_weights(fresh, path) == {"lora": 16, "base": 0}
    x, uni, t = torch.randn(1, 16, 16, 16), torch.randn(1, 16, 96), torch.tensor([300])
    with torch.no_grad():
        assert torch.equal(fresh(x, uni, t).sample, model(x, uni, t).sample)


def test_published_full_pth_and_peft_key_styles_load(tiny_transformer, tmp_path):
    """The published .pth holds the whole adapted transformer with peft names (`.base_layer.`, `.default`);
    adapter-only files may or may not carry the `transformer.` prefix and the adapter name."""
    model = add_lora(tiny_transformer)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    full = model.state_dict()
    assert any(".base_layer." in k for k in full) and any(".lora_A.default." in k for k in full)
    torch.save(full, tmp_path / "mist_her2_lora.pth")
    other = add_lora(build_tiny_transformer(seed=1))  # different base weights: the file's must win
    assert load_lora_weights(other, tmp_path / "mist_her2_lora.pth")["base"] > 0
    x, uni, t = torch.randn(1, 16, 16, 16), torch.randn(1, 16, 96), torch.tensor([300])
    with torch.no_grad():
        assert torch.equal(other(x, uni, t).sample, model(x, uni, t).sample)

    peft_style = {k: v for k, v in full.items() if "lora_" in k}  # `.default` kept, no prefix
    torch.save(peft_style, tmp_path / "peft.pth")
    third = add_lora(build_tiny_transformer(seed=0))
    assert load_lora_weights(third, tmp_path / "peft.pth") == {"lora": 16, "base": 0}
    assert torch.equal(
        lora_state_dict(third)["transformer_blocks.1.attn2.to_v.lora_B.weight"],
        lora_state_dict(model)["transformer_blocks.1.attn2.to_v.lora_B.weight"],
    )


def test_bad_lora_files_are_one_line_errors(tiny_transformer, tmp_path):
    model = add_lora(tiny_transformer)
    sd = lora_state_dict(model)
    torch.save({k: v for k, v in sd.items() if "blocks.1.attn2.to_q" not in k}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing: transformer_blocks\.1\.attn2\.to_q"):
        load_lora_weights(model, tmp_path / "missing.pth")
    rank8 = add_lora(build_tiny_transformer(seed=0), LoRASettings(rank=8, alpha=8))
    save_lora_weights(rank8, tmp_path / "rank8.safetensors")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_lora_weights(model, tmp_path / "rank8.safetensors")
    torch.save({"transformer_blocks.0.attn2.to_q.weight": torch.zeros(2)}, tmp_path / "nolora.pth")
    with pytest.raises(ValueError, match="no lora_A/lora_B weights"):
        load_lora_weights(model, tmp_path / "nolora.pth")
    full = dict(model.state_dict())
    full.pop("proj_out.weight")
    torch.save(full, tmp_path / "partial_full.pth")
    with pytest.raises(ValueError, match="missing keys: proj_out.weight"):
        load_lora_weights(model, tmp_path / "partial_full.pth")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        load_lora_weights(build_tiny_transformer(), tmp_path / "rank8.safetensors")
