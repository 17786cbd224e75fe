"""virtual_staining trainers on tiny models and a small synthetic MIST folder: losses, exact resume, adapter-only
checkpoints, exported weights that the stainer loads, config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion.model.flow_mlp import load_flow_mlp
from diffusion.model.lora import add_lora, load_lora_weights, lora_delta_norm, read_lora_settings
from diffusion.standins import build_tiny_transformer
from tests.helpers.vs_data import make_mist
from virtual_staining.tiny import build_tiny_parts

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models

FLOW_CFG = "configs/virtual_staining/tiny_flow_mlp.py"
LORA_CFG = "configs/virtual_staining/tiny_lora.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mist")
    make_mist(root, "HER2", "train", n=4, size=1024)  # 1024 px: 16 UNI tokens of 256 px tiles per image
    make_mist(root, "HER2", "val", n=1, size=1024)
    parts = build_tiny_parts(tmp_path_factory.mktemp("tiny"))
    return root, parts, tmp_path_factory.mktemp("embeddings")  # one token cache for every run below


def run(module, cfg: str, work_dir: Path, setup, *options: str) -> int:
    root, parts, emb = setup
    argv = [cfg, "--work-dir", str(work_dir), "--data-root", str(root), "--stain", "HER2", "--cfg-options",
            f"uni={parts.uni}", f"data.embeddings_dir={emb}", *options]  # fmt: skip
    return module.cli(argv)


def test_flow_trainer_exact_resume_and_export(setup, tmp_path):
    from train_scripts import train_flow_mlp

    # straight 6 steps, vs 4 steps then the same command again with 6 (resumes from the step-4 checkpoint)
    assert run(train_flow_mlp, FLOW_CFG, tmp_path / "a", setup, "max_steps=6", "ema_rate=0.9") == 0
    assert run(train_flow_mlp, FLOW_CFG, tmp_path / "b", setup, "max_steps=4", "ema_rate=0.9") == 0
    assert run(train_flow_mlp, FLOW_CFG, tmp_path / "b", setup, "max_steps=6", "ema_rate=0.9") == 0
    a = load_file(str(tmp_path / "a" / "flow_mlp.safetensors"))
    b = load_file(str(tmp_path / "b" / "flow_mlp.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["out.2.weight"], torch.zeros_like(a["out.2.weight"]))  # it trained
    log = (tmp_path / "b" / "train.log").read_text()
    assert "resumed from" in log and "validation: mse" in log
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-0000004", "checkpoint-0000006"]  # every 4 steps + the last, keep_last 3
    model = load_flow_mlp(tmp_path / "a" / "flow_mlp.safetensors")  # what stain.py --flow loads
    assert model.config.in_channels == 96 and model.config.num_res_blocks == 2


def test_lora_trainer_adapter_only_checkpoints_and_exact_resume(setup, tmp_path):
    from train_scripts import train_lora

    _, parts, _ = setup
    opts = (f"model={parts.transformer}", f"vae={parts.vae}")
    assert run(train_lora, LORA_CFG, tmp_path / "a", setup, "max_steps=3", *opts) == 0
    assert run(train_lora, LORA_CFG, tmp_path / "b", setup, "max_steps=2", *opts) == 0
    assert run(train_lora, LORA_CFG, tmp_path / "b", setup, "max_steps=3", *opts) == 0
    a = load_file(str(tmp_path / "a" / "lora.safetensors"))
    b = load_file(str(tmp_path / "b" / "lora.safetensors"))
    assert len(a) == 16 and all(torch.equal(a[k], b[k]) for k in a)

    ckpt = tmp_path / "b" / "checkpoints" / "checkpoint-0000002"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # accelerate's model file: the adapter only
    assert (ckpt / "model.safetensors").stat().st_size < 200_000
    assert (tmp_path / "b" / "validation" / "step_0000002.png").is_file()

    model = add_lora(build_tiny_transformer(), read_lora_settings(tmp_path / "a" / "lora.safetensors"))
    load_lora_weights(model, tmp_path / "a" / "lora.safetensors")
    assert lora_delta_norm(model) > 0  # the adapter moved away from its zero start


def test_trainer_config_errors_are_one_line(setup, tmp_path, capsys):
    from train_scripts import train_flow_mlp, train_lora

    assert run(train_flow_mlp, FLOW_CFG, tmp_path / "x", setup, "flow.widht=3") == 2
    assert "unknown config key flow.'widht'" in capsys.readouterr().err
    assert train_flow_mlp.cli([FLOW_CFG, "--work-dir", str(tmp_path / "y")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert (
        run(train_flow_mlp, FLOW_CFG, tmp_path / "z", setup, "flow.in_channels=32", "flow.out_channels=32")
        == 2
    )
    assert "flow.in_channels=32, but the UNI tokens" in capsys.readouterr().err
    _, parts, _ = setup
    assert run(train_lora, LORA_CFG, tmp_path / "w", setup, f"model={parts.transformer}", f"vae={parts.vae}",
               "data.resize_to_model=False") == 2  # fmt: skip
    assert "data.image_size 1024 px, but" in capsys.readouterr().err
    assert (
        train_lora.cli([LORA_CFG, "--work-dir", str(tmp_path / "v"), "--data-root", "x", "--stain", "CD3"])
        == 2
    )
    assert "MIST stain 'CD3'" in capsys.readouterr().err


def test_every_virtual_staining_config_loads():
    from diffusion.config import CONFIG_ROOT, load_strict_config

    CONFIG_DIR = CONFIG_ROOT / "virtual_staining"

    for path in sorted(CONFIG_DIR.glob("*.py")):
        schema = CONFIG_DIR / "_base_" / ("lora.py" if "lora" in path.name else "flow_mlp.py")
        cfg = load_strict_config(path, schema)
        assert cfg.data.root is None and cfg.dataset in ("MIST", "HER2Match")
    pub = load_strict_config(CONFIG_DIR / "lora_mist.py", CONFIG_DIR / "_base_" / "lora.py")
    assert (pub.lora.rank, pub.lora.alpha) == (4, 4.0) and pub.model == "StonyBrook-CVLab/PixCell-1024"
    assert list(pub.lora.targets) == ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


@pytest.mark.slow
def test_lora_trainer_two_processes_resume(setup, tmp_path):
    """Two real CPU processes (gloo DDP): adapter-only checkpoints save and load on both ranks."""
    import json
    import os
    import subprocess
    import sys

    root, parts, emb = setup
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])))  # fmt: skip
    for steps in (2, 3):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--dynamo_backend", "no", "-m", "train_scripts.train_lora", LORA_CFG, "--work-dir",
               str(tmp_path / "run"), "--data-root", str(root), "--cfg-options", f"model={parts.transformer}",
               f"vae={parts.vae}", f"uni={parts.uni}", f"data.embeddings_dir={emb}", "train_batch_size=1",
               f"max_steps={steps}"]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "env.json").read_text())["world_size"] == 2
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-0000003" / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
