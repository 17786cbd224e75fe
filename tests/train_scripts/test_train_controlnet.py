"""train_scripts/train_controlnet.py end to end on tiny models: a run that trains the ControlNet only, exact resume,
two real processes, validation grids, portable weights, bad input. Runs call the script's `cli()` in this process;
the 2-process run is a real `accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusion.checkpoints import latest_checkpoint, list_checkpoints
from diffusion.model.controlnet import load_controlnet
from diffusion.model.loading import load_transformer
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.controlnet_pipeline import PixCellControlNetPipeline
from tests.helpers.mask_pairs import write_pairs
from tests.helpers.paths import REPO
from train_scripts.train_controlnet import cli

SCRIPT = str(REPO / "train_scripts" / "train_controlnet.py")
TINY = str(REPO / "configs" / "controlnet" / "tiny.py")
# Constant LR: a run stopped at step 2 and resumed to 4 then has the same schedule as 4 steps in one go.
COMMON = ("lr_schedule.type='constant'", "validation.every_steps=4")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_vae_dir, tiny_uni_dir) -> dict:
    root = tmp_path_factory.mktemp("cn_data")
    write_pairs(root, 6)
    torch.manual_seed(0)
    base = build_pixcell("PixCell-tiny-256", caption_channels=96)
    for p in base.parameters():  # a "trained" base: every weight non-zero
        p.data.normal_(0, 0.05)
    base.save_pretrained(root / "base")
    return {"root": root, "vae": tiny_vae_dir, "uni": tiny_uni_dir}


def args(setup: dict, work: Path, *options: str) -> list[str]:
    r = setup["root"]
    return [TINY, "--work-dir", str(work), "--images", str(r / "images"), "--masks", str(r / "masks"),
            "--uni", str(setup["uni"]), "--base-model", str(r / "base"), "--vae", str(setup["vae"]),
            "--report-to", "none", "--cfg-options", *COMMON, *options]  # fmt: skip


def final_state(work: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(work)
    out = {f"model.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    opt = torch.load(ckpt / "optimizer.bin", weights_only=False)["state"]
    out.update({f"opt.{i}.{k}": v for i, s in opt.items() for k, v in s.items() if torch.is_tensor(v)})
    return out


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, setup) -> Path:
    work = tmp_path_factory.mktemp("straight")
    assert cli(args(setup, work, "max_steps=4")) == 0
    return work


def test_run_trains_only_the_controlnet_and_writes_loadable_weights(straight_run, setup):
    assert [p.name for p in list_checkpoints(straight_run)] == ["checkpoint-0000002", "checkpoint-0000004"]
    assert len(list((setup["root"] / "images").glob("*_uni.npy"))) == 6  # written by --uni
    base = load_transformer(setup["root"] / "base")
    controlnet = load_controlnet(latest_checkpoint(straight_run) / "controlnet")
    assert controlnet.num_blocks == 2
    # The control layers moved off zero; the frozen parts are still the base's.
    assert controlnet.controlnet_blocks[0].weight.abs().sum() > 0
    assert controlnet.cond_pos_embed.proj.weight.abs().sum() > 0
    for name in ("pos_embed.proj.weight", "proj_out.weight", "scale_shift_table"):
        assert torch.equal(controlnet.state_dict()[name], base.state_dict()[name]), name
    assert not torch.equal(
        controlnet.transformer_blocks[0].ff.net[2].weight, base.transformer_blocks[0].ff.net[2].weight
    )
    # Validation grid: one held-out row of [mask | reference | 2 samples].
    grid = np.asarray(Image.open(straight_run / "validation" / "step_0000004.png"))
    assert grid.shape == (256, 4 * 256, 3)
    mask = np.asarray(Image.open(setup["root"] / "masks" / "p5.png")) > 0
    assert np.array_equal(grid[:, :256, 0] > 127, mask)  # the held-out pair is the last one
    # The portable folder drives the pipeline.
    pipe = PixCellControlNetPipeline.from_parts(
        base, latest_checkpoint(straight_run) / "controlnet", setup["vae"]
    )
    out = pipe(
        torch.randn(1, 1, 96), mask=setup["root"] / "masks" / "p0.png", num_inference_steps=2, progress=False
    )
    assert out.images[0].size == (256, 256)


def test_exact_resume(tmp_path, straight_run, setup):
    """2 steps, then the same command to 4 steps == 4 steps in one go, bit for bit."""
    assert cli(args(setup, tmp_path, "max_steps=2")) == 0
    assert cli(args(setup, tmp_path, "max_steps=4")) == 0
    assert "resumed from" in (tmp_path / "train.log").read_text()
    a, b = final_state(tmp_path), final_state(straight_run)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_two_processes(tmp_path, setup):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    # the launcher as a module of this interpreter: no console script (whose shebang names one venv path)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*accelerate, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, *args(setup, tmp_path, "max_steps=2")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "env.json").read_text())["world_size"] == 2  # two real processes
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-0000002"
    assert {p.name for p in ckpt.glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["images_seen"] == 2 * 2 * 2
    load_controlnet(ckpt / "controlnet")


def test_bad_input_is_one_error_line(tmp_path, setup, capsys):
    assert cli([TINY, "--work-dir", str(tmp_path / "w"), "--masks", "m"]) == 2
    assert capsys.readouterr().err.startswith("error: pairs.image_dir not set: pass --images")
    write_pairs(tmp_path / "bad", 3, seed=1)
    colour = np.zeros((256, 256, 3), np.uint8)
    colour[..., 1] = 255
    Image.fromarray(colour).save(tmp_path / "bad" / "masks" / "p1.png")
    bad = dict(setup, root=tmp_path / "bad")
    (tmp_path / "bad" / "base").symlink_to(setup["root"] / "base")
    assert cli(args(bad, tmp_path / "w", "max_steps=1", "pairs.max_failure_rate=0.0")) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress bars share stderr; the error is the last line
    assert last.startswith("error: ") and "p1.png: colour RGB image" in last
