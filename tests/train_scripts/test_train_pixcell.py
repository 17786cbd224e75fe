"""End-to-end tests of train_scripts/train_pixcell.py on CPU with the tiny config, on features of the real slide.

Fixture data: the embedded real H&E region tiled into 512 px patches (tools.extract_patches), four of them indexed
and encoded by the tiny VAE / tiny UNI stand-ins (tools.extract_features, npy and packed). Single-process runs
call the script's `cli()` in this process; the 2-process and SIGTERM runs are real subprocesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion.checkpoints import latest_checkpoint, list_checkpoints
from diffusion.config import build_model_from_config, load_config
from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.model.loading import load_transformer, save_original_checkpoint
from tests.helpers.features import write_random_features
from tests.helpers.paths import REPO
from train_scripts.train_pixcell import cli

TINY = str(REPO / "configs" / "tiny" / "pixcell_tiny_256.py")
SCRIPT = str(REPO / "train_scripts" / "train_pixcell.py")
# Tiny models for the three stages share patch_size 8 so that 1024 px stays cheap (16x16 tokens).
STAGE = {
    256: "model_overrides={'patch_size':8}",
    512: "model_overrides={'patch_size':8,'sample_size':64,'interpolation_scale':1.0,'caption_num_tokens':4}",
    1024: "model_overrides={'patch_size':8,'sample_size':128,'interpolation_scale':2.0,'caption_num_tokens':16}",
}


@pytest.fixture(scope="module")
def synthetic_1024(tmp_path_factory) -> Path:
    """Two random 1024 px 'patches' in the published npy layout (for the stage-3 run only)."""
    return write_random_features(tmp_path_factory.mktemp("synthetic_1024") / "patches", 2, 1024, "syn_1024")


def train(work_dir: Path, data: Path, *options: str, extra: tuple[str, ...] = ()) -> int:
    argv = [TINY, "--work-dir", str(work_dir), "--data-root", str(data), "--report-to", "none", *extra]
    if options:
        argv += ["--cfg-options", *options]
    return cli(argv)


def final_state(work_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(work_dir)
    out = {f"model.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    ema = load_file(ckpt / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    out.update({f"ema.{k}": v for k, v in ema.items()})
    opt = torch.load(ckpt / "optimizer.bin", weights_only=False)["state"]
    out.update({f"opt.{i}.{k}": v for i, s in opt.items() for k, v in s.items() if torch.is_tensor(v)})
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, real_features) -> Path:
    """6 steps in one go (warm-up 2 steps, checkpoints every 2)."""
    work = tmp_path_factory.mktemp("straight")
    assert train(work, real_features, "max_steps=6", "lr_schedule.warmup_steps=2") == 0
    return work


def test_straight_run_lowers_the_loss_and_writes_a_complete_run(straight_run, real_features):
    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(straight_run)]
    assert steps == [2, 4, 6]
    for name in ("config.py", "env.json", "train.log"):
        assert (straight_run / name).is_file()
    # Loss on fixed batches (same x0, t, noise, condition) before and after training.
    cfg = load_config(TINY, {"data.root": str(real_features)})
    torch.manual_seed(cfg.seed)
    initial = build_model_from_config(cfg).eval()
    trained = load_transformer(latest_checkpoint(straight_run) / "transformer").eval()
    from diffusion.data.datasets import PatchFeatureDataset

    ds = PatchFeatureDataset(root=real_features, resolution=256, parent_size=512)
    gen = torch.Generator().manual_seed(1)
    x0 = (torch.stack([ds[i]["latent"] for i in range(8)]) - cfg.vae_shift) * cfg.vae_scale
    uni = torch.stack([ds[i]["uni"] for i in range(8)])
    diffusion = GaussianDiffusion()
    t = torch.randint(50, 1000, (8,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = diffusion.q_sample(x0, t, noise)
    with torch.no_grad():
        losses = [diffusion.training_losses(m(x_t, uni, t).sample, x0, x_t, t, noise).mse.mean() for m in
                  (initial, trained)]  # fmt: skip
    assert losses[1] < losses[0] - 0.01, losses


def test_compiled_blocks_train_the_same_weights_under_the_same_names(tmp_path, straight_run, real_features):
    """`compile=...` through the CLI: the blocks are compiled (aot_eager: no C++ compiler needed in the test),
    checkpoints keep the plain parameter names and the first 2 steps give the straight run's weights."""
    assert train(tmp_path, real_features, "max_steps=2", "lr_schedule.warmup_steps=2",
                 "compile.enabled=True", "compile.backend=aot_eager") == 0  # fmt: skip
    assert "compiled the transformer blocks" in (tmp_path / "train.log").read_text()
    ours = load_file(latest_checkpoint(tmp_path) / "model.safetensors")
    ref = load_file(list_checkpoints(straight_run)[0] / "model.safetensors")  # checkpoint-2 of the same run
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_exact_resume_from_half_way_in_the_other_storage_format(tmp_path, straight_run, real_features):
    """3 steps, then the run resumed to 6 (packed features this time) == 6 straight steps, bit for bit."""
    opts = ("lr_schedule.warmup_steps=2", "data.feature_format='packed'")
    assert train(tmp_path, real_features, "max_steps=3", *opts) == 0
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000003"
    assert train(tmp_path, real_features, "max_steps=6", *opts) == 0
    assert "resumed from" in (tmp_path / "train.log").read_text()
    assert_bitwise_equal(final_state(tmp_path), final_state(straight_run))


CAME = "optimizer={'type':'CAME','lr':1e-3,'weight_decay':0.0,'betas':(0.9,0.999,0.9999),'eps':(1e-30,1e-16)}"


def test_exact_resume_with_came(tmp_path, real_features):
    """The published optimizer (multi-tensor CAME, its state stacked per shape) through accelerate's checkpoints:
    2 + 2 resumed steps == 4 straight, bit for bit; the saved state has came-pytorch's per-parameter keys."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight, real_features, "max_steps=4", CAME) == 0
    assert train(resumed, real_features, "max_steps=2", CAME) == 0
    assert train(resumed, real_features, "max_steps=4", CAME) == 0
    assert "resumed from" in (resumed / "train.log").read_text()
    state = final_state(resumed)
    assert any(k.endswith(".exp_avg_sq_row") for k in state) and any(k.endswith(".exp_avg_sq") for k in state)
    assert_bitwise_equal(state, final_state(straight))


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes_exactly(
    tmp_path, straight_run, real_features
):
    cmd = [sys.executable, SCRIPT, TINY, "--work-dir", str(tmp_path), "--data-root", str(real_features),
           "--report-to", "none", "--cfg-options", "max_steps=6", "lr_schedule.warmup_steps=2",
           "save_every_steps=100"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "train.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "step 1/6" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "received SIGTERM" in out
    ckpt = latest_checkpoint(tmp_path)
    stopped_at = int(ckpt.name.split("-")[1])
    assert 1 <= stopped_at < 6, out[-2000:]
    load_transformer(ckpt / "transformer_ema")  # loadable
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000006"
    assert_bitwise_equal(final_state(tmp_path), final_state(straight_run))


def test_two_processes_make_the_same_number_of_steps(tmp_path, real_features):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    # the launcher as a module of this interpreter: no console script (whose shebang names one venv path)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*accelerate, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, TINY, "--work-dir", str(tmp_path),
           "--data-root", str(real_features), "--report-to", "none", "--cfg-options", "max_steps=3"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    env_info = json.loads((tmp_path / "env.json").read_text())
    assert env_info["world_size"] == 2  # two real processes, not two copies of one
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-0000003"
    assert {p.name for p in ckpt.glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["images_seen"] == 3 * 2 * 2  # steps x processes x batch
    load_transformer(ckpt / "transformer_ema")
    # The 2-process checkpoint resumes in a single process (not bitwise: another world size).
    assert train(tmp_path, real_features, "max_steps=4") == 0
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000004"


def test_three_stages_and_published_weights(tmp_path, real_features, synthetic_1024, tiny_vae_dir):
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    val = ("validation.every_steps=2", "validation.num_images=2", "validation.num_inference_steps=2",
           f"validation.vae='{tiny_vae_dir}'")  # fmt: skip
    assert train(s1, real_features, STAGE[256], "max_steps=2", *val) == 0
    grid = np.asarray(__import__("PIL.Image").Image.open(s1 / "validation" / "step_0000002.png"))
    assert grid.shape == (2 * 256, 2 * 256, 3)  # rows of [real | EMA sample]
    assert (
        train(s2, real_features, STAGE[512], "resolution=512", "max_steps=1", extra=("--load-from", str(s1)))
        == 0
    )
    report = (s2 / "init_report.txt").read_text()
    assert "uncond_embedding" in report and "y_pos_embed" in report and "pos_embed.pos_embed" in report
    s1_w = load_file(latest_checkpoint(s1) / "transformer" / "diffusion_pytorch_model.safetensors")
    s2_init = load_transformer(latest_checkpoint(s1) / "transformer")  # same weights went into stage 2
    assert torch.equal(s2_init.proj_out.weight, s1_w["proj_out.weight"])
    assert train(s3, synthetic_1024, STAGE[1024], "resolution=1024", "data.parent_size=1024", "max_steps=1",
                 extra=("--load-from", str(s2))) == 0  # fmt: skip
    assert "16 token(s) (source: 4" in (s3 / "init_report.txt").read_text()
    # A published-format (original .pth) checkpoint initialises a run.
    pth = tmp_path / "published.pth"
    save_original_checkpoint(load_transformer(latest_checkpoint(s1) / "transformer_ema"), pth, as_ema=True)
    s4 = tmp_path / "s4"
    assert (
        train(s4, real_features, STAGE[256], "max_steps=1", "load_ema=True", extra=("--load-from", str(pth)))
        == 0
    )
    assert "0 tensors copied" not in (s4 / "init_report.txt").read_text()


def test_export_pipeline_loads(tmp_path, straight_run, tiny_vae_dir):
    from diffusion.sampling.pipeline import PixCellPipeline
    from tools.export_pipeline import main as export

    assert export([str(straight_run), str(tmp_path / "pipe"), "--vae", str(tiny_vae_dir)]) == 0
    pipe = PixCellPipeline.from_pretrained(tmp_path / "pipe")
    ema = load_file(
        latest_checkpoint(straight_run) / "transformer_ema" / "diffusion_pytorch_model.safetensors"
    )
    assert torch.equal(pipe.transformer.proj_out.weight, ema["proj_out.weight"])
    images = pipe(torch.randn(1, 1, 96), num_inference_steps=2, output_type="np", progress=False).images
    assert images.shape == (1, 256, 256, 3)


def test_work_dir_is_a_model_source(straight_run):
    from diffusion.model.loading import load_transformer

    ckpt = latest_checkpoint(straight_run)
    for ema, folder in ((True, "transformer_ema"), (False, "transformer")):
        saved = load_file(ckpt / folder / "diffusion_pytorch_model.safetensors")
        for source in (straight_run, ckpt):  # a work dir (latest checkpoint) or one checkpoint
            model = load_transformer(source, ema=ema)
            assert torch.equal(model.proj_out.weight, saved["proj_out.weight"])


def test_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, real_features, capsys):
    opts = (
        "max_steps=20",
        "save_every_steps=1",
        "max_nonfinite_steps=2",
        "optimizer.lr=1e30",
        "gradient_clip=0",
    )
    assert train(tmp_path, real_features, *opts) == 2
    err = capsys.readouterr().err
    assert "consecutive steps with a non-finite loss or gradient" in err and "last good checkpoint" in err
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and not list((tmp_path / "checkpoints").glob(".checkpoint-*"))
    load_transformer(ckpt / "transformer")


def test_config_that_does_not_fit_the_data_is_a_clear_error(tmp_path, real_features, capsys, monkeypatch):
    assert train(tmp_path, real_features, "model_overrides={'caption_channels':1536}") == 2
    assert "UNI features of shape (1, 96)" in capsys.readouterr().err
    assert train(tmp_path, real_features, "resolution=512") == 2
    assert "needs 512 px" in capsys.readouterr().err
    monkeypatch.delenv("PIXCELL_DATA_ROOT", raising=False)
    assert cli([TINY, "--work-dir", str(tmp_path)]) == 2
    assert "pass --data-root or set PIXCELL_DATA_ROOT" in capsys.readouterr().err


def test_processes_outside_the_process_group_are_refused(tmp_path, real_features, capsys, monkeypatch):
    """A launcher that started 2 processes which accelerate does not join (FSDP asked for on a machine without
    GPUs) must not give two independent runs writing one work dir."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train(tmp_path, real_features, "max_steps=1") == 2
    assert "2 processes were launched but accelerate set up 1" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path) is None
