"""Virtual staining in both directions: weights trained here -> the published `.pth` layout -> our stainer gives
the same pixels; the flow-integration and norm-rescaling options of stain.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.command import run_cli
from diffusion.model.flow_mlp import load_flow_mlp, rescale_norm
from tests.helpers.vs_data import make_mist, write_image
from virtual_staining.export_published import main as export
from virtual_staining.stain import main as stain
from virtual_staining.tiny import build_tiny_parts

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA and a flow MLP trained here (2 steps each, tiny parts, synthetic MIST)."""
    from train_scripts import train_flow_mlp, train_lora

    root = make_mist(tmp_path_factory.mktemp("mist"), "HER2", "train", n=4, size=1024)
    parts = build_tiny_parts(tmp_path_factory.mktemp("tiny"))
    emb, work = tmp_path_factory.mktemp("emb"), tmp_path_factory.mktemp("runs")
    common = ["--data-root", str(root), "--stain", "HER2", "--cfg-options", f"uni={parts.uni}",
              f"data.embeddings_dir={emb}", "data.val_split=None", "validation.every_steps=0", "max_steps=2"]  # fmt: skip
    lora_cfg, flow_cfg = "configs/virtual_staining/tiny_lora.py", "configs/virtual_staining/tiny_flow_mlp.py"
    assert train_lora.cli([lora_cfg, "--work-dir", str(work / "lora"), *common, f"model={parts.transformer}",
                           f"vae={parts.vae}", "optimizer.lr=0.05"]) == 0  # fmt: skip
    assert train_flow_mlp.cli([flow_cfg, "--work-dir", str(work / "flow"), *common]) == 0
    return parts, work / "lora" / "lora.safetensors", work / "flow" / "flow_mlp.safetensors"


def test_trained_weights_round_trip_through_the_published_layout(trained, tmp_path):
    parts, lora, flow = trained
    assert export(["--target", "mist_her2", "--out", str(tmp_path / "release"), "--model", str(parts.transformer),
                   "--lora", str(lora), "--flow", str(flow)]) == 0  # fmt: skip
    pub_lora = tmp_path / "release" / "ckpts" / "lora" / "mist_her2_lora.pth"
    pub_flow = tmp_path / "release" / "ckpts" / "mlp" / "mist_her2_mlp.pth"
    # the published layout: one plain state dict of the whole adapted transformer, peft names
    state = torch.load(pub_lora, weights_only=True)
    assert any(".base_layer." in k for k in state) and any(".lora_A.default." in k for k in state)
    assert "transformer_blocks.0.attn2.to_q.base_layer.weight" in state and "proj_out.weight" in state
    assert set(torch.load(pub_flow, weights_only=True)) == set(load_flow_mlp(flow).state_dict())

    he = tmp_path / "he"
    write_image(he / "a.png", 1024, 3)
    base = ["--input", str(he), "--stain", "HER2", "--model", str(parts.transformer), "--vae", str(parts.vae),
            "--uni", str(parts.uni), "--steps", "3", "--flow-steps", "5", "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    runs = {
        "ours": ["--lora", str(lora), "--flow", str(flow)],
        "published": ["--lora", str(pub_lora), "--flow", str(pub_flow)],
        "base": ["--no-lora", "--flow", str(flow)],
    }
    out = {}
    for name, extra in runs.items():
        assert run_cli(stain, [*base, *extra, "--out", str(tmp_path / name)]) == 0
        out[name] = np.asarray(Image.open(tmp_path / name / "a.png"))
    assert np.array_equal(out["ours"], out["published"])  # same pixels
    assert not np.array_equal(out["ours"], out["base"])  # and the trained adapter does something


def test_flow_grid_and_norm_rescaling_options(trained):
    _, _, flow_file = trained
    flow = load_flow_mlp(flow_file)
    he = torch.randn(2, 16, 96) * 3
    uniform = flow.translate(he, steps=10)
    clipped = flow.translate(he, steps=10, grid="clipped")
    assert uniform.shape == he.shape and not torch.allclose(uniform, clipped)
    rescaled = rescale_norm(uniform, he)
    assert torch.allclose(rescaled.norm(dim=-1).mean(-1), he.norm(dim=-1).mean(-1), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(rescaled, uniform, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)  # directions unchanged
    with pytest.raises(ValueError, match="flow grid 'cosine'"):
        flow.translate(he, grid="cosine")


def test_stain_cli_takes_the_options_and_export_errors_are_one_line(trained, tmp_path, capsys):
    parts, lora, flow = trained
    he = tmp_path / "he"
    write_image(he / "a.png", 1024, 4)
    args = ["--input", str(he), "--stain", "HER2", "--model", str(parts.transformer), "--vae", str(parts.vae),
            "--uni", str(parts.uni), "--lora", str(lora), "--flow", str(flow), "--steps", "2", "--flow-steps", "4",
            "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    assert run_cli(stain, [*args, "--out", str(tmp_path / "a")]) == 0
    assert (
        run_cli(stain, [*args, "--flow-grid", "clipped", "--rescale-norm", "--out", str(tmp_path / "b")]) == 0
    )
    a, b = (np.asarray(Image.open(tmp_path / d / "a.png")) for d in ("a", "b"))
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert run_cli(export, ["--target", "x", "--out", str(tmp_path)]) == 2
    assert "nothing to export" in capsys.readouterr().err
    assert run_cli(export, ["--target", "x", "--out", str(tmp_path), "--flow", str(tmp_path / "no.pth")]) == 2
    assert "--flow" in capsys.readouterr().err and not Path(tmp_path / "ckpts").exists()
