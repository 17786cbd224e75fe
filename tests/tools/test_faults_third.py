"""The fault battery, third part (issue 24): black images recorded as done, unbounded numeric flags, outputs that
cannot be written found only at the end, Ctrl-C, the app open to the network, resume with a changed model, and
config.json of the wrong types. Each case and a close variant, through the real tools on tiny models; the
outcome asserted: exit status, the one `error:` line (no traceback), and what is (not) written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.command import run_cli

REPO = Path(__file__).resolve().parents[2]
TRACEBACK = "Traceback (most recent call last)"
C = 96  # the tiny UNI stand-in's embedding size


def one_error_line(err: str) -> str:
    """Exactly one `error:` line and no traceback in a tool's stderr; returns that line."""
    assert TRACEBACK not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def t64(tmp_path_factory) -> Path:
    """A tiny one-token transformer (64 px images) saved like a released one."""
    from diffusion.model.pixcell_transformer import build_pixcell

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("t64") / "model"
    build_pixcell("PixCell-tiny-64", caption_channels=C).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def diverged(t64, tmp_path_factory) -> Path:
    """The same model with one NaN weight (a diverged run's export): every image it makes is NaN."""
    from diffusion.model.pixcell_transformer import PixCellTransformer2DModel

    model = PixCellTransformer2DModel.from_pretrained(t64)
    with torch.no_grad():
        model.proj_out.weight[0, 0] = float("nan")
    out = tmp_path_factory.mktemp("diverged") / "model"
    model.save_pretrained(out)
    return out


def _tool(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    import importlib

    rc = run_cli(importlib.import_module(f"tools.{tool}").main, argv)
    return rc, capsys.readouterr().err


def _embeddings(path: Path, n: int = 2, poke: float | None = None) -> str:
    e = np.random.default_rng(0).standard_normal((n, 1, C)).astype(np.float32)
    if poke is not None:
        e[-1, 0, 3] = poke
    np.save(path, e)
    return str(path)


#################################################################################
#           1. Images that are not images are never written or recorded         #
#################################################################################


def test_sample_with_a_diverged_model_writes_nothing(diverged, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "--model",
        str(diverged),
        "--vae",
        str(tiny_vae_dir),
        "--embeddings",
        _embeddings(tmp_path / "e.npy"),
        "--out",
        str(out),
        "--steps",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    rc, err = _tool("sample", argv, capsys)
    line = one_error_line(err)
    assert rc == 2 and "e_000000: the latents came out with NaN or Inf values, not written" in line
    assert "likely cause: steps beyond the sampler's schedule, a very large guidance scale" in line
    assert not list(out.rglob("*.png")) and not (out / "manifest.jsonl").exists()


def test_sample_4k_with_a_diverged_model_writes_nothing(diverged, tiny_vae_dir, tmp_path, capsys):
    np.save(tmp_path / "grid.npy", np.random.default_rng(0).standard_normal((2, 3, C)).astype(np.float32))
    out = tmp_path / "out"
    argv = [
        "--model",
        str(diverged),
        "--vae",
        str(tiny_vae_dir),
        "--grid",
        str(tmp_path / "grid.npy"),
        "--out",
        str(out),
        "--steps",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    rc, err = _tool("sample_4k", argv, capsys)
    assert rc == 2 and "grid: the latents came out with NaN or Inf values" in one_error_line(err)
    assert not list(out.rglob("*.png")) and not (out / "manifest.jsonl").exists()


def test_pipeline_and_prior_refuse_unusable_images(diverged, t64, tiny_vae_dir):
    from diffusion.sampling.checks import UnusableImage
    from diffusion.sampling.pipeline import PixCellPipeline

    pipe = PixCellPipeline.from_parts(diverged, tiny_vae_dir)
    with pytest.raises(UnusableImage, match="image 0: the latents came out with NaN or Inf"):
        pipe(torch.randn(1, 1, C), num_inference_steps=2, progress=False)
    # a finite condition far outside UNI2-h's range (one value of 1e30 made its image black)
    pipe = PixCellPipeline.from_parts(t64, tiny_vae_dir)
    cond = torch.randn(2, 1, C)
    cond[1, 0, 5] = 1e30
    with pytest.raises(ValueError, match=r"uni_embeds: row 1: holds values up to 1e\+30"):
        pipe(cond, num_inference_steps=2, progress=False)


def test_collapsed_images_are_unusable():
    from diffusion.sampling.checks import UnusableImage, check_images

    x = torch.rand(3, 3, 8, 8)
    x[1] = 0.0  # all black
    seen: list[UnusableImage] = []
    assert check_images(x, ["a", "b", "c"], "decoded image", on_unusable=seen.append) == [True, False, True]
    assert str(seen[0]).startswith("b: the decoded image came out all black (every value 0), not written")
    x[1] = 1.0  # all white: a blank background tile may decode so
    assert check_images(x, ["a", "b", "c"], "decoded image") == [True, True, True]
    x[1] = 0.0
    cond = torch.zeros(3, 1, C)
    cond[1, 0, 0] = float("inf")
    with pytest.raises(UnusableImage, match="likely cause: its condition holds NaN or Inf") as info:
        check_images(x, ["a", "b", "c"], "decoded image", cond)
    assert info.value.condition_fault


def test_embeddings_with_one_extreme_value_are_refused(t64, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "--model",
        str(t64),
        "--vae",
        str(tiny_vae_dir),
        "--embeddings",
        _embeddings(tmp_path / "e.npy", poke=1e30),
        "--out",
        str(out),
        "--steps",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    rc, err = _tool("sample", argv, capsys)
    assert rc == 2 and "e.npy row 1: holds values up to 1e+30" in one_error_line(err)
    assert not list(out.rglob("*.png"))


#################################################################################
#             2. Numeric flags: bounded, checked before anything loads          #
#################################################################################

NOT_A_MODEL = "/nonexistent/model"  # a range error must come before the model is looked for


@pytest.mark.parametrize(
    "tool, flags, message",
    [
        ("sample", ["--steps", "1000"], "--steps 1000: dpm-solver takes at most 999 steps"),
        (
            "sample",
            ["--steps", "1000", "--sampler", "sa-solver"],
            "--steps 1000: sa-solver takes at most 999",
        ),
        ("sample", ["--steps", "1000", "--sampler", "sde-dpm-solver"], "sde-dpm-solver takes at most 999"),
        (
            "sample",
            ["--steps", "100000000", "--sampler", "ddim"],
            "--steps 100000000: ddim takes at most 1000",
        ),
        ("sample", ["--steps", "60", "--sampler", "lcm"], "--steps 60: lcm takes at most 50"),
        ("sample", ["--steps", "0"], "--steps 0: expected a whole number >= 1"),
        ("sample", ["--guidance", "1e30"], "--guidance 1e+30: expected at most 100 in size"),
        ("sample", ["--batch", "0"], "--batch 0: expected >= 1"),
        ("sample", ["--vae-batch", "0"], "--vae-batch 0: expected >= 1"),
        ("sample", ["--jpeg-quality", "0"], "--jpeg-quality 0: expected >= 1"),
        ("sample_4k", ["--steps", "5000"], "--steps 5000: dpm-solver takes at most 999"),
        ("sample_4k", ["--vae-batch", "0"], "--vae-batch 0: expected >= 1"),
        ("augment", ["--steps", "1000"], "--steps 1000: dpm-solver takes at most 999"),
    ],
)
def test_numeric_flags_out_of_range_stop_before_loading(tool, flags, message, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "data" / "a" / "x.png")
    source = {
        "sample": ["--embeddings", _embeddings(tmp_path / "e.npy")],
        "sample_4k": ["--grid", _embeddings(tmp_path / "g.npy")],
        "augment": [str(tmp_path / "data"), "--per-image", "1"],
    }[tool]
    argv = ["--model", NOT_A_MODEL, *source, "--out", str(tmp_path / "out"), "--device", "cpu", *flags]
    rc, err = _tool(tool, argv, capsys)
    assert rc == 2 and message in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_library_settings_refuse_zero_batches():
    from diffusion.sampling.runner import RegionSettings, SampleSettings
    from diffusion.sampling.samplers import resolve_sampling

    sampling = resolve_sampling("dpm-solver", None, None, tokens=1)
    with pytest.raises(ValueError, match="`batch_size` 0: expected >= 1"):
        SampleSettings(sampling, batch_size=0)
    with pytest.raises(ValueError, match="`vae_batch` 0: expected >= 1"):
        SampleSettings(sampling, vae_batch=0)
    with pytest.raises(ValueError, match="`num_inference_steps` 1000: dpm-solver takes at most 999"):
        resolve_sampling("dpm-solver", 1000, None, tokens=1)
    with pytest.raises(ValueError, match="`stride` 0"):
        RegionSettings(stride=0)


#################################################################################
#            4. Ctrl-C: trainers save like SIGTERM; tools stop cleanly           #
#################################################################################

TOY_TRAINER = """
import argparse, sys, time
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
import torch
from mmengine.config import Config
from torch import nn
from diffusion.training.run import RunSettings, launch, run_trainer, start_run
from diffusion.command import run_cli

work = Path(sys.argv[1])

def main(args):
    cfg = Config(dict(seed=0, optimizer=dict(type="AdamW", lr=1e-2, weight_decay=0.0),
                      lr_schedule=dict(type="constant", warmup_steps=0), ema_rate=None, keep_last=2,
                      report_to="none", log_every_steps=1, save_every_steps=1000))
    accelerator, resume = launch(work, None)
    run = start_run(accelerator, RunSettings.from_config(cfg), work, nn.Linear(4, 1), 1000, resume)
    with run.loop(run.save) as loop:
        while run.state["step"] < run.total_steps and not loop.should_stop(run.state["step"]):
            loss = run.model(torch.ones(2, 4)).pow(2).mean()
            accelerator.backward(loss)
            grad_norm, step = run.optimizer_step(None)
            loop.log_step(step, loss, run.lr, grad_norm)
            loop.save_if_due(step)
            print("step", step, flush=True)
            time.sleep(0.05)
    return run.finish()

sys.exit(run_cli(lambda argv: run_trainer(main, argparse.Namespace()), []))
"""


def _interrupt(cmd: list[str], ready: str, timeout: float = 120) -> tuple[int, str, str]:
    """Start `cmd`, wait for a stdout line starting with `ready`, send SIGINT (Ctrl-C) -> (status, out, err)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(ready):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(lines) + out, err


def test_ctrl_c_in_a_trainer_saves_a_checkpoint_and_exits_130(tmp_path):
    from diffusion.checkpoints import latest_checkpoint

    work = tmp_path / "work"
    rc, out, err = _interrupt([sys.executable, "-c", TOY_TRAINER, str(work)], "step 2")
    assert rc == 130, err
    assert TRACEBACK not in err and "KeyboardInterrupt" not in err
    ckpt = latest_checkpoint(work)
    assert ckpt is not None  # saved like SIGTERM (save_every_steps is 1000: only the stop saved it)
    (line,) = [x for x in err.splitlines() if x.startswith("interrupted (Ctrl-C)")]
    assert f"the latest checkpoint is {ckpt}" in line and "run the same command again" in line
    assert "received SIGINT: saving a checkpoint" in (work / "train.log").read_text()


def test_ctrl_c_in_sample_is_one_line_and_130(t64, tiny_vae_dir, tmp_path):
    out = tmp_path / "out"
    e = _embeddings(tmp_path / "e.npy", n=64)
    cmd = [
        sys.executable,
        "-m",
        "tools.sample",
        "--model",
        str(t64),
        "--vae",
        str(tiny_vae_dir),
        "--embeddings",
        e,
        "--out",
        str(out),
        "--steps",
        "20",
        "--batch",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    proc_rc, stdout, err = _interrupt_when_written(cmd, out / "syn")
    assert proc_rc == 130, err
    assert TRACEBACK not in err and "KeyboardInterrupt" not in err
    assert "interrupted (Ctrl-C): every file already written is whole; run the same command again" in err
    from PIL import Image

    written = list((out / "syn").glob("*.png"))
    assert written and len(written) < 64
    for png in written:  # whole images
        with Image.open(png) as im:
            im.load()


def _interrupt_when_written(cmd: list[str], folder: Path, timeout: float = 120) -> tuple[int, str, str]:
    """Start `cmd`, send SIGINT once `folder` holds a file -> (status, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if folder.is_dir() and any(folder.glob("*.png")):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


#################################################################################
#       3. Outputs and caches that cannot be written: found before the work     #
#################################################################################


@pytest.fixture(scope="module")
def eval_folders(tmp_path_factory) -> dict:
    """Two folders of 4 small random images (64 and 96 px) and a tiny timm encoder spec."""
    from PIL import Image

    from diffusion.standins import build_tiny_timm_encoder

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for name, size in (("real", 64), ("syn", 64), ("big", 96)):
        (root / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(root / name / f"{i}.png")
    return {"root": root, "encoder": f"vit={build_tiny_timm_encoder(root / 'vit')},pool=cls"}


def _evaluate(folders: dict, *extra: str, syn: str = "syn") -> list[str]:
    root = folders["root"]
    return [
        str(root / "real"),
        str(root / syn),
        "--metrics",
        "fd_vit",
        "--encoder",
        folders["encoder"],
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-progress",
        *extra,
    ]


def test_evaluate_refuses_an_unwritable_out_before_any_feature(eval_folders, tmp_path, capsys, monkeypatch):
    from diffusion.metrics import evaluation
    from tools import evaluate

    def no_work(*args, **kwargs):
        raise AssertionError("features computed before the output was checked")

    monkeypatch.setattr(evaluation, "embed_images", no_work)
    regular = tmp_path / "a_file"
    regular.write_text("not a folder")
    rc = evaluate.main(_evaluate(eval_folders, "--out", str(regular / "report"), "--cache", "none"))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"--out {regular / 'report'}: a component of the path is a regular file" in line
    # the variant: a --cache-dir under a regular file
    rc = evaluate.main(
        _evaluate(eval_folders, "--out", str(tmp_path / "r"), "--cache-dir", str(regular / "c"))
    )
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"--cache-dir {regular / 'c'}: a component of the path is a regular file" in line
    assert regular.read_text() == "not a folder" and not (tmp_path / "r").exists()


def test_evaluate_read_only_out_and_cache(eval_folders, tmp_path, capsys):
    from diffusion.writable import check_writable

    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root (CI runs as root)")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)], check=True)
    try:
        with pytest.raises(OSError, match="Read-only file system") as info:
            check_writable(ro / "report", "--out")
        assert info.value.filename == f"--out {ro / 'report'}"
        from tools import evaluate

        rc = evaluate.main(
            _evaluate(eval_folders, "--out", str(tmp_path / "r"), "--cache-dir", str(ro / "c"))
        )
        assert rc == 2 and "read-only file system" in one_error_line(capsys.readouterr().err)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_evaluate_names_different_image_sizes(eval_folders, tmp_path, capsys):
    from tools import evaluate

    out = tmp_path / "report"
    assert evaluate.main(_evaluate(eval_folders, "--out", str(out), "--cache", "none", syn="big")) == 0
    err = capsys.readouterr().err
    assert "warning: REAL images are 64x64 px, SYN 96x96 px" in err
    report = json.loads((out / "metrics.json").read_text())
    assert report["real"]["sizes"] == {"64x64": 4} and report["syn"]["sizes"] == {"96x96": 4}
    assert "4 images of 96x96 px" in (out / "report.md").read_text()


@pytest.mark.parametrize("tool", ["sample", "sample_4k"])
def test_sampling_out_under_a_file_stops_before_loading(tool, tmp_path, capsys):
    regular = tmp_path / "a_file"
    regular.write_text("x")
    source = ["--embeddings" if tool == "sample" else "--grid", _embeddings(tmp_path / "e.npy")]
    argv = ["--model", NOT_A_MODEL, *source, "--out", str(regular / "out"), "--device", "cpu"]
    rc, err = _tool(tool, argv, capsys)
    assert (
        rc == 2
        and f"--out {regular / 'out'}: a component of the path is a regular file" in one_error_line(err)
    )


#################################################################################
#              5. The app on the network: a login, or a warning                 #
#################################################################################


@pytest.fixture
def launched(monkeypatch) -> dict:
    """gr.Blocks.launch replaced: records the Blocks and the launch arguments instead of serving."""
    import gradio as gr

    seen: dict = {}

    def launch(self, *args, **kwargs):
        seen.update(kwargs, blocks=self)

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    return seen


def _page_warning(blocks) -> str | None:
    for block in blocks.blocks.values():
        if getattr(block, "elem_id", None) == "exposure-warning":
            return block.value
    return None


def test_app_on_every_interface_without_login_warns_in_terminal_and_page(
    t64, tiny_vae_dir, tiny_uni_dir, tmp_path, launched, capsys
):
    import socket

    from tools.app import main

    with socket.socket() as probe:  # a free port (nothing listens: launch is replaced)
        probe.bind(("", 0))
        port = str(probe.getsockname()[1])
    models = ["--model", str(t64), "--vae", str(tiny_vae_dir), "--uni", str(tiny_uni_dir), "--device", "cpu"]
    assert run_cli(main, [*models, "--host", "0.0.0.0", "--port", port]) == 0
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0 serves this app to the network without a login" in err
    assert launched["auth"] is None and "--auth USER:PASS" in _page_warning(launched["blocks"])
    # the variant: logins from a file (and --auth) go to Gradio's auth; no warning then
    import argparse

    from tools.app import exposure_warning, read_auth

    logins = tmp_path / "logins"
    logins.write_text("ana:s3cret\nbo:pw:with:colons\n")
    auth = read_auth(argparse.Namespace(auth="cy:x", auth_file=str(logins)))
    assert auth == [("cy", "x"), ("ana", "s3cret"), ("bo", "pw:with:colons")]
    assert exposure_warning("0.0.0.0", auth) is None and exposure_warning("::1", None) is None
    assert exposure_warning("gpu-node-3", None) is not None


def test_app_bad_login_or_busy_port_is_one_line_before_loading(tmp_path, launched, capsys):
    import socket

    from tools.app import main

    rc = run_cli(main, ["--model", NOT_A_MODEL, "--host", "0.0.0.0", "--auth", "ana"])
    assert rc == 2 and "--auth: expected USER:PASS" in one_error_line(capsys.readouterr().err)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = run_cli(main, ["--model", NOT_A_MODEL, "--port", str(port)])
    line = one_error_line(capsys.readouterr().err)
    assert (
        rc == 2
        and f"--port {port}: cannot listen on 127.0.0.1:{port}" in line
        and "pass another --port" in line
    )
    assert "GRADIO_SERVER_PORT" not in line and not launched


#################################################################################
#        6. Resume: configs compared before restoring; hand edits reported      #
#################################################################################

TINY = "configs/tiny/pixcell_tiny_256.py"


def _train_pixcell(work: Path, data: Path, *options: str) -> int:
    from train_scripts.train_pixcell import cli

    argv = [TINY, "--work-dir", str(work), "--data-root", str(data), "--report-to", "none"]
    return cli([*argv, "--cfg-options", "lr_schedule.warmup_steps=0", "save_every_steps=1", *options])


def test_resume_with_another_model_size_is_one_line_naming_the_keys(real_features, tmp_path, capsys):
    work = tmp_path / "work"
    assert _train_pixcell(work, real_features, "max_steps=1") == 0
    capsys.readouterr()
    before = (work / "config.py").read_text()
    assert _train_pixcell(work, real_features, "max_steps=2", "model_overrides.num_layers=3") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "config key model_overrides.num_layers is None there and 3 now, and cannot change" in line
    assert "state_dict" not in line and "size mismatch" not in line and len(line) < 400
    # the variant: several keys at once are all named, in one line
    assert _train_pixcell(work, real_features, "max_steps=2", "model_overrides.num_layers=3", "seed=7") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "config keys model_overrides.num_layers (None there, 3 now), seed (0 there, 7 now) cannot" in line
    assert (work / "config.py").read_text() == before


def test_a_hand_edited_config_py_is_reported_and_kept(real_features, tmp_path, capsys):
    work = tmp_path / "work"
    assert _train_pixcell(work, real_features, "max_steps=1") == 0
    edited = (work / "config.py").read_text() + "\ntrain_batch_size = 64  # my edit\n"
    (work / "config.py").write_text(edited)
    assert _train_pixcell(work, real_features, "max_steps=2") == 0
    log = (work / "train.log").read_text()
    assert f"{work / 'config.py'} was edited by hand since the last run wrote it" in log
    assert (work / "config.py.edited").read_text() == edited
    assert "my edit" not in (work / "config.py").read_text()  # config.py records what ran
    assert "edited by hand" in capsys.readouterr().err


#################################################################################
#              7. Configs of the wrong types: one line naming the key           #
#################################################################################


@pytest.fixture(scope="module")
def mistyped(t64, tmp_path_factory) -> Path:
    """The tiny model with `"num_layers": "two"` in its config.json (valid JSON, wrong type)."""
    import shutil

    out = tmp_path_factory.mktemp("mistyped") / "model"
    shutil.copytree(t64, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_layers": "two"}))
    return out


@pytest.mark.parametrize("tool", ["convert_checkpoint", "sample"])
def test_config_json_of_the_wrong_type_is_one_line(tool, mistyped, tiny_vae_dir, tmp_path, capsys):
    if tool == "convert_checkpoint":
        argv = [str(mistyped), str(tmp_path / "out.pth")]
    else:
        argv = [
            "--model",
            str(mistyped),
            "--vae",
            str(tiny_vae_dir),
            "--embeddings",
            _embeddings(tmp_path / "e.npy"),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    rc, err = _tool(tool, argv, capsys)
    line = one_error_line(err)
    assert rc == 2 and f"{mistyped}: config.json: config key num_layers is 'two' (str), expected int" in line
    assert not (tmp_path / "out.pth").exists()


def test_python_config_values_of_the_wrong_type_are_one_line():
    from diffusion.config import build_model_from_config, load_config, parse_cfg_options

    with pytest.raises(ValueError, match=r"config key train_batch_size is '64' \(str\), expected int"):
        load_config(TINY, parse_cfg_options(["train_batch_size='64'"]))
    with pytest.raises(ValueError, match=r"config key validation.every_steps is 2.5 \(float\), expected int"):
        load_config(TINY, parse_cfg_options(["validation.every_steps=2.5"]))
    cfg = load_config(TINY, parse_cfg_options(["model_overrides.num_layers='two'"]))
    with pytest.raises(
        ValueError, match="config model_overrides: config key num_layers is 'two' .str., expected int"
    ):
        build_model_from_config(cfg)
    assert (
        load_config(TINY, parse_cfg_options(["optimizer.lr=1"])).optimizer.lr == 1
    )  # an int for a float: fine
