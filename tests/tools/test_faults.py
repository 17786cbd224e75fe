"""The standing fault battery: bad input and failing environments, through the real command-line tools on tiny
models and the real slide. Each case asserts its outcome: the exit status, the one `error:` line (no traceback),
and that nothing written before is damaged.

The kills live beside the code they interrupt, sharing its fixtures: kill -9 during checkpoint saves and SIGTERM
then resume (tests/train_scripts/test_train_pixcell.py, tests/diffusion/training/test_training_run.py), a killed
and resumed sampling run (tests/tools/test_sample.py::test_resume_after_kill_is_byte_identical), a killed patch
extraction (tests/diffusion/data/test_data_slides.py::test_killed_extraction_resumes_to_identical_output).

Full and read-only disks are real: a small tmpfs mounted for the test (the tests run as root in CI; elsewhere
those cases skip, saying why).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers.paths import REPO
from tools import build_index, extract_features, extract_patches

TRACEBACK = "Traceback (most recent call last)"


def one_error_line(err: str) -> str:
    """The tool's stderr holds exactly one `error:` line and no traceback; returns that line."""
    assert TRACEBACK not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size_kib: int, readonly: bool = False) -> Iterator[Path]:
    """A real file system of `size_kib` KiB at `path` (read-only when asked), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_kib}k" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave_bytes: int = 0) -> None:
    """Fill the file system holding `path` up to `leave_bytes` free."""
    free = shutil.disk_usage(path).free
    with open(path / ".filler", "wb") as fh:
        fh.write(b"\0" * max(free - leave_bytes, 0))


@pytest.fixture(scope="module")
def slide_patches(tmp_path_factory, real_slide) -> Path:
    """The real slide tiled into 256 px patches and indexed."""
    root = tmp_path_factory.mktemp("patches")
    argv = [str(real_slide), "--out", str(root), "--dataset", "cmu", "--group", "demo", "--patch-size", "256"]
    assert extract_patches.main(argv) == 0
    assert build_index.main(["--root", str(root)]) == 0
    return root


#################################################################################
#                     Slides whose resolution is implausible                    #
#################################################################################


def test_plain_tiff_with_72_dpi_tags_asks_for_mpp(tmp_path, capsys):
    """A plain TIFF's 72-dpi tags read as 352.8 um/px: one line that says to pass --mpp, no ZeroDivisionError."""
    tiff = tmp_path / "scan.tif"
    image = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    tifffile.imwrite(
        tiff, image, tile=(256, 256), resolution=(72, 72), resolutionunit="INCH", photometric="rgb"
    )
    rc = extract_patches.main([str(tiff), "--out", str(tmp_path / "out"), "--dataset", "x", "--group", "y"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert "352.8" in line and "pass --mpp" in line and str(tiff) in line
    # the same slide with the resolution given tiles normally
    rc = extract_patches.main(
        [str(tiff), "--out", str(tmp_path / "out"), "--dataset", "x", "--group", "y", "--mpp", "0.5"]
    )
    assert rc == 0


def test_implausible_mpp_flag_is_one_line(real_slide, tmp_path, capsys):
    argv = [str(real_slide), "--out", str(tmp_path), "--dataset", "x", "--group", "y", "--mpp", "400"]
    assert extract_patches.main(argv) == 2
    assert "--mpp says 400 um/px" in one_error_line(capsys.readouterr().err)


#################################################################################
#                   Outputs that are read-only, not folders, full               #
#################################################################################


def test_extract_patches_unwritable_outputs(real_slide, tmp_path, capsys):
    base = [str(real_slide), "--dataset", "cmu", "--group", "demo", "--patch-size", "256"]
    regular = tmp_path / "a_file"
    regular.write_text("not a folder")
    assert extract_patches.main([*base, "--out", str(regular / "patches")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(regular) in line and "regular file" in line
    assert regular.read_text() == "not a folder"

    with tmpfs(tmp_path / "ro", 1024, readonly=True) as ro:
        assert extract_patches.main([*base, "--out", str(ro / "patches")]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(ro) in line and "read-only file system" in line

    with tmpfs(tmp_path / "full", 256) as full:
        assert extract_patches.main([*base, "--out", str(full / "patches")]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(full) in line and "no space left on the device" in line and "MiB free" in line
        # what was written is whole: every patch on disk decodes, no temporary file is left
        from PIL import Image

        for png in (full / "patches").rglob("*.png"):
            with Image.open(png) as im:
                im.load()
        assert not list((full / "patches").rglob(".*.tmp"))


def test_build_index_unwritable_outputs(slide_patches, tmp_path, capsys):
    index = slide_patches / "metadata" / "patch_names_all.hdf5"
    before = index.read_bytes()
    regular = tmp_path / "a_file"
    regular.write_text("x")
    assert build_index.main(["--from", str(index), "--output", str(regular / "index.hdf5")]) == 2
    assert "regular file" in one_error_line(capsys.readouterr().err)
    with tmpfs(tmp_path / "ro", 1024, readonly=True) as ro:
        assert build_index.main(["--from", str(index), "--output", str(ro / "index.hdf5")]) == 2
        assert "read-only file system" in one_error_line(capsys.readouterr().err)
    with tmpfs(tmp_path / "full", 64) as full:
        fill(full)
        assert build_index.main(["--from", str(index), "--output", str(full / "index.hdf5")]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(full / "index.hdf5") in line and "no space left" in line
        assert not (full / "index.hdf5").exists()
    assert index.read_bytes() == before


def test_extract_features_full_disk_keeps_what_was_written(slide_patches, tiny_vae_dir, tiny_uni_dir, tmp_path,
                                                           capsys):  # fmt: skip
    enc = ["--root", str(slide_patches), "--vae", str(tiny_vae_dir), "--uni", str(tiny_uni_dir)]
    enc += ["--device", "cpu", "--num-workers", "0", "--format", "npy"]
    regular = tmp_path / "a_file"
    regular.write_text("x")
    assert extract_features.main([*enc, "--features-root", str(regular / "f")]) == 2
    assert "regular file" in one_error_line(capsys.readouterr().err)
    with tmpfs(tmp_path / "ro", 1024, readonly=True) as ro:
        assert extract_features.main([*enc, "--features-root", str(ro)]) == 2
        assert "read-only file system" in one_error_line(capsys.readouterr().err)
    with tmpfs(tmp_path / "full", 96) as full:  # room for a few tiny-VAE npy files, not all
        assert extract_features.main([*enc, "--features-root", str(full)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(full) in line and "no space left" in line
        written = sorted(full.rglob("*.npy"))
        assert written, "expected some features before the disk filled"
        for f in written:  # every file on disk is whole
            assert np.load(f).size > 0
        assert not list(full.rglob(".*.tmp"))


#################################################################################
#                          Checkpoints and configs                              #
#################################################################################


def _tiny_transformer():
    from diffusion.model.pixcell_transformer import PixCellTransformer2DModel

    return PixCellTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, num_layers=1, cross_attention_dim=16, sample_size=8,
        caption_channels=32,
    )  # fmt: skip


def test_truncated_safetensors_names_the_file(tmp_path, capsys):
    from tools import convert_checkpoint

    folder = tmp_path / "transformer"
    _tiny_transformer().save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    assert convert_checkpoint.run_cli(convert_checkpoint.main, [str(folder), str(tmp_path / "out.pth")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(folder) in line and "diffusion_pytorch_model.safetensors" in line and "log in" not in line
    assert not (tmp_path / "out.pth").exists()


def test_convert_checkpoint_unknown_keys_names_the_file(tmp_path, capsys):
    import torch

    from diffusion.model.loading import save_original_checkpoint
    from tools import convert_checkpoint

    ckpt = tmp_path / "model.pth"
    save_original_checkpoint(_tiny_transformer(), ckpt)
    data = torch.load(ckpt, weights_only=True)
    data["state_dict"]["extra_head.weight"] = torch.zeros(2)
    torch.save(data, ckpt)
    assert convert_checkpoint.run_cli(convert_checkpoint.main, [str(ckpt), str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(ckpt) in line and "extra_head.weight" in line


def test_cfg_options_whole_dict_as_in_config_files(tmp_path):
    from diffusion.config import load_config, parse_cfg_options

    tiny = "configs/tiny/pixcell_tiny_256.py"
    cfg = load_config(tiny, parse_cfg_options(["optimizer=dict(type='CAME', lr=1e-4)"]))
    assert cfg.optimizer["type"] == "CAME" and cfg.optimizer["lr"] == 1e-4
    with pytest.raises(ValueError, match=r"config key optimizer must be a dict \(got str 'CAME'\)"):
        load_config(tiny, parse_cfg_options(["optimizer=CAME"]))


#################################################################################
#                         One run per work dir / output                         #
#################################################################################


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that takes the folder's lock and waits (until killed)."""
    code = (
        "import sys, time; from diffusion.lock import FolderLock; "
        f"lock = FolderLock({str(folder)!r}).acquire(); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_folder_lock_names_the_holder_and_dies_with_it(tmp_path):
    from diffusion.lock import FolderInUse, FolderLock

    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(
            FolderInUse, match=rf"in use by another run \(host .+, PID {holder.pid}, started "
        ):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
    with FolderLock(tmp_path, what="work dir"):
        pass


#################################################################################
#                        Sampling: guidance, strides, sources                   #
#################################################################################

C = 96  # the tiny UNI stand-in's embedding size


@pytest.fixture(scope="module")
def t64(tmp_path_factory) -> Path:
    """A tiny one-token transformer (64 px images) saved like a released one."""
    import torch

    from diffusion.model.pixcell_transformer import build_pixcell

    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-64", caption_channels=C).eval()
    out = tmp_path_factory.mktemp("t64") / "model"
    model.save_pretrained(out)
    return out


def _sample(argv: list[str], capsys, tool: str = "sample") -> tuple[int, str]:
    import importlib

    from diffusion.command import run_cli

    rc = run_cli(importlib.import_module(f"tools.{tool}").main, argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "guidance, message",
    [("nan", "--guidance nan: expected a finite number"), ("inf", "--guidance inf: expected a finite number"),
     ("-1", "--guidance -1: a negative scale pushes samples away from their condition; pass "
            "--allow-negative-guidance")],
)  # fmt: skip
def test_guidance_not_finite_or_negative_is_one_line(t64, tiny_vae_dir, tmp_path, capsys, guidance, message):
    np.save(tmp_path / "e.npy", np.random.default_rng(0).standard_normal((2, 1, C)).astype(np.float32))
    out = tmp_path / "out"
    base = ["--model", str(t64), "--vae", str(tiny_vae_dir), "--embeddings", str(tmp_path / "e.npy"),
            "--out", str(out), "--steps", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    rc, err = _sample([*base, "--guidance", guidance], capsys)
    assert rc == 2 and message in one_error_line(err)
    assert not list(out.rglob("*.png")), "no image may be written"
    if guidance == "-1":  # meant: the flag says so
        rc, err = _sample([*base, "--guidance", guidance, "--allow-negative-guidance"], capsys)
        assert rc == 0 and len(list((out / "syn").glob("*.png"))) == 2


def test_pipeline_and_region_refuse_nan_guidance(t64, tiny_vae_dir):
    import torch

    from diffusion.sampling.large_image import denoise_region
    from diffusion.sampling.pipeline import PixCellPipeline

    pipe = PixCellPipeline.from_parts(t64, tiny_vae_dir)
    cond = torch.randn(1, 1, C)
    with pytest.raises(ValueError, match="`guidance_scale` nan: expected a finite number"):
        pipe(cond, guidance_scale=float("nan"), num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="`num_inference_steps` 2.5: expected a whole number"):
        pipe(cond, num_inference_steps=2.5, progress=False)
    with pytest.raises(ValueError, match="`guidance_scale` -2: a negative scale"):
        denoise_region(pipe.transformer, torch.randn(2, 2, C), guidance_scale=-2.0, num_inference_steps=2)


def test_sample_4k_default_stride_follows_a_one_token_model(t64, tiny_vae_dir, tmp_path, capsys):
    np.save(tmp_path / "grid.npy", np.random.default_rng(0).standard_normal((2, 3, C)).astype(np.float32))
    out = tmp_path / "out"
    argv = ["--model", str(t64), "--vae", str(tiny_vae_dir), "--grid", str(tmp_path / "grid.npy"),
            "--out", str(out), "--steps", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    rc, err = _sample(argv, capsys, "sample_4k")
    assert rc == 0, err
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert row["stride"] == 8  # one window (one token of 8 latent px) per step: no overlap possible


def test_a_run_whose_every_condition_failed_exits_2(t64, tiny_vae_dir, tiny_uni_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(folder / "a.png")
    data = (folder / "a.png").read_bytes()
    (folder / "a.png").write_bytes(data[: len(data) // 2])  # truncated
    argv = ["--model", str(t64), "--vae", str(tiny_vae_dir), "--uni", str(tiny_uni_dir), "--images",
            str(folder), "--out", str(tmp_path / "out"), "--steps", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    rc, err = _sample(argv, capsys)
    assert (
        rc == 2 and "no image written" in one_error_line(err) and "none of the 16 conditions" in err
    )  # 16 crops of 64 px


#################################################################################
#                 Trainers: one run per work dir, resume, non-finite            #
#################################################################################

TINY = "configs/tiny/pixcell_tiny_256.py"


def _train_pixcell(work: Path, data: Path, *options: str) -> int:
    from train_scripts.train_pixcell import cli

    argv = [TINY, "--work-dir", str(work), "--data-root", str(data), "--report-to", "none"]
    return cli([*argv, "--cfg-options", "lr_schedule.warmup_steps=0", *options])


def test_second_run_on_a_work_dir_or_output_stops_naming_the_holder(real_features, t64, tiny_vae_dir, tmp_path,
                                                                      capsys):  # fmt: skip
    work = tmp_path / "work"
    holder = _hold_lock(work)
    try:
        assert _train_pixcell(work, real_features, "max_steps=1") == 2
        line = one_error_line(capsys.readouterr().err)
        assert "this work dir is in use by another run (host " in line and f"PID {holder.pid}" in line
        assert not (work / "train.log").exists() and not (work / "config.py").exists()  # nothing touched
        out = tmp_path / "out"
        _hold = _hold_lock(out)
        np.save(tmp_path / "e.npy", np.zeros((1, 1, C), np.float32))
        rc, err = _sample(["--model", str(t64), "--vae", str(tiny_vae_dir), "--embeddings",
                           str(tmp_path / "e.npy"), "--out", str(out), "--steps", "1", "--no-progress"], capsys)  # fmt: skip
        assert rc == 2 and "output folder is in use by another run" in one_error_line(err)
        assert not (out / "run.json").exists()
        _hold.kill()
    finally:
        holder.kill()
        holder.wait()
    assert _train_pixcell(work, real_features, "max_steps=1") == 0  # the holder died: its lock went with it


def test_resume_applies_a_new_learning_rate_and_refuses_other_changes(real_features, tmp_path, capsys):
    import torch

    from diffusion.checkpoints import latest_checkpoint

    work = tmp_path / "work"
    assert _train_pixcell(work, real_features, "max_steps=2", "optimizer.lr=1e-3") == 0
    # Another batch size cannot change on resume: one line naming the key, config.py as it was.
    before = (work / "config.py").read_text()
    assert _train_pixcell(work, real_features, "max_steps=4", "train_batch_size=1") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "config key train_batch_size" in line and "cannot change when a run resumes" in line
    assert (work / "config.py").read_text() == before
    # The learning rate can: optimizer and schedule follow, the log says so, config.py records what runs.
    assert _train_pixcell(work, real_features, "max_steps=4", "optimizer.lr=2.5e-4") == 0
    log = (work / "train.log").read_text()
    assert "resume: config optimizer.lr changed from 0.001 to 0.00025" in log
    assert "lr=0.00025" in (work / "config.py").read_text().replace(" ", "")
    groups = torch.load(latest_checkpoint(work) / "optimizer.bin", weights_only=False)["param_groups"]
    assert all(g["lr"] == pytest.approx(2.5e-4) for g in groups)


def test_trainer_keyerror_is_one_line(real_features, tmp_path, capsys):
    assert _train_pixcell(tmp_path, real_features, "max_steps=1", "data.dataset_keys=['nonexistent']") == 2
    assert "nonexistent" in one_error_line(capsys.readouterr().err)


def _toy_trainer(
    work: Path,
    nan_steps: set[int] = frozenset(),
    nan_weights_at: int | None = None,
    total: int = 8,
    before_save: dict | None = None,  # {step: callable} run just before the checkpoint of that step
) -> int:
    """The skeleton's minimal trainer on a linear model; its loss is NaN at `nan_steps`, its weights are set to
    NaN after step `nan_weights_at`."""
    import argparse

    import torch
    from mmengine.config import Config
    from torch import nn

    from diffusion.training.run import RunSettings, launch, run_trainer, start_run

    def main(args):
        cfg = Config(dict(seed=0, optimizer=dict(type="AdamW", lr=1e-2, weight_decay=0.0),
                          lr_schedule=dict(type="constant", warmup_steps=0), ema_rate=None, keep_last=2,
                          report_to="none", log_every_steps=1, save_every_steps=1, max_nonfinite_steps=3))  # fmt: skip
        accelerator, resume = launch(work, None)
        torch.manual_seed(0)
        run = start_run(accelerator, RunSettings.from_config(cfg), work, nn.Linear(4, 1), total, resume)
        with run.loop(run.save) as loop:
            while run.state["step"] < run.total_steps and not loop.should_stop(run.state["step"]):
                loss = run.model(torch.ones(2, 4)).pow(2).mean()
                if run.state["step"] + 1 in nan_steps:
                    loss = loss * float("nan")
                accelerator.backward(loss)
                grad_norm, step = run.optimizer_step(None)
                if step == nan_weights_at:
                    run.unwrapped.weight.data[0, 0] = float("nan")
                loop.log_step(step, loss, run.lr, grad_norm)
                (before_save or {}).get(step, lambda: None)()
                loop.save_if_due(step)
        return run.finish()

    from diffusion.command import run_cli

    return run_cli(lambda argv: run_trainer(main, argparse.Namespace()), [])


def test_no_checkpoint_is_written_or_pruned_during_a_nonfinite_streak(tmp_path, capsys):
    from diffusion.checkpoints import list_checkpoints

    assert _toy_trainer(tmp_path, nan_steps={3, 4, 5}) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "3 consecutive steps with a non-finite loss" in line
    assert "checkpoint-0000002" in line  # the last one written before the streak, still there
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000001", "checkpoint-0000002"]
    assert (
        "not saving a checkpoint during 1 non-finite steps in a row" in (tmp_path / "train.log").read_text()
    )


def test_weights_that_are_not_finite_are_never_saved(tmp_path, capsys):
    from diffusion.checkpoints import list_checkpoints

    assert _toy_trainer(tmp_path, nan_weights_at=2) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "step 2: the weights hold NaN or Inf, not saving them" in line and "checkpoint-0000001" in line
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000001"]


def test_trainer_on_a_full_disk_names_it_and_keeps_the_last_checkpoint(tmp_path, capsys):
    import torch

    from diffusion.checkpoints import list_checkpoints

    with tmpfs(tmp_path / "full", 2048) as full:
        work = full / "work"
        assert _toy_trainer(work) == 0
        kept = list_checkpoints(work)
        assert [p.name for p in kept] == ["checkpoint-0000007", "checkpoint-0000008"]
        # resumed at 8; the disk fills up before the save of step 9
        assert _toy_trainer(work, total=12, before_save={9: lambda: fill(full)}) == 2
        line = one_error_line(capsys.readouterr().err)
        assert (
            "no space left on the device" in line
            and ".checkpoint-0000009.tmp" in line
            and "MiB needed" in line
        )
        assert list_checkpoints(work) == kept  # the earlier checkpoints are whole and still load
        torch.load(kept[-1] / "trainer_state.pt", weights_only=False)
        assert not list((work / "checkpoints").glob(".checkpoint-*"))  # no half-written folder left behind


#################################################################################
#        The standing cases: bad input that already gets one line or a skip     #
#################################################################################


def _npy(path: Path, array) -> str:
    np.save(path, array)
    return str(path)


SAMPLE_CASES = {
    # name: (how to make the --embeddings file, the expected text of the one line)
    "NaN embeddings": (lambda d: _npy(d / "nan.npy", np.full((1, 1, C), np.nan, np.float32)), "NaN"),
    "wrong token count": (lambda d: _npy(d / "t3.npy", np.zeros((1, 3, C), np.float32)), "t3.npy"),
    "wrong embedding dim": (
        lambda d: _npy(d / "dim.npy", np.zeros((1, 1, 768), np.float32)),
        "UNI dim is 96",
    ),
    "zero-byte npy": (lambda d: (d / "empty.npy").write_bytes(b"") or str(d / "empty.npy"), "empty.npy"),
    "missing file": (lambda d: str(d / "missing.npy"), "missing.npy"),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sampling_bad_conditions(case, t64, tiny_vae_dir, tmp_path, capsys):
    make, expected = SAMPLE_CASES[case]
    argv = ["--model", str(t64), "--vae", str(tiny_vae_dir), "--embeddings", make(tmp_path),
            "--out", str(tmp_path / "out"), "--steps", "1", "--no-progress"]  # fmt: skip
    rc, err = _sample(argv, capsys)
    assert rc == 2 and expected in one_error_line(err)
    assert not list((tmp_path / "out").rglob("*.png"))


TRAIN_CASES = {
    # name: (--cfg-options, the expected text of the one line)
    "typo'd config key": (["optimzer.lr=1e-4"], "unknown config key 'optimzer'"),
    "resolution not a multiple of 256": (["resolution=300"], "300"),
    "missing dataset key": (["data.dataset_keys=['gtex_1024']"], "gtex_1024"),
    "checkpoint of another size": (["load_from='{other}'"], "not the same architecture"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_bad_input(case, real_features, tmp_path, capsys):
    from diffusion.model.pixcell_transformer import build_pixcell

    options, expected = TRAIN_CASES[case]
    if "{other}" in options[0]:  # the tiny config's preset, one block deeper
        depth = build_pixcell("PixCell-tiny-256").config.num_layers + 1
        build_pixcell("PixCell-tiny-256", caption_channels=C, num_layers=depth).save_pretrained(
            tmp_path / "other"
        )
    options = [o.format(other=tmp_path / "other") for o in options]
    assert _train_pixcell(tmp_path / "work", real_features, "max_steps=1", *options) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not list((tmp_path / "work").rglob("checkpoint-*"))


@pytest.mark.parametrize("damage", ["zero-byte", "wrong shape", "NaN", "missing"])
def test_training_skips_and_counts_a_damaged_feature_file(damage, real_features, tmp_path):
    """One damaged feature file of four: a logged, counted skip, and the run completes (max_failure_rate 0.5)."""
    data = tmp_path / "patches"
    shutil.copytree(real_features, data)
    uni = sorted(data.rglob("*_uni.npy"))[0]
    if damage == "zero-byte":
        uni.write_bytes(b"")
    elif damage == "wrong shape":
        np.save(uni, np.zeros((3, 7), np.float16))
    elif damage == "NaN":
        np.save(uni, np.full(np.load(uni).shape, np.nan, np.float16))
    else:
        uni.unlink()
    work = tmp_path / "work"
    assert _train_pixcell(work, data, "max_steps=2", "train_batch_size=2", "data.max_failure_rate=0.5") == 0
    log = (work / "train.log").read_text()
    patch = uni.name.replace("_uni.npy", "")
    assert f"skip sample {uni.parent.relative_to(data)}/{patch}" in log and "failed of" in log


def test_slide_without_mpp_and_unpaired_staining_pairs(tmp_path, capsys):
    tiff = tmp_path / "nompp.tif"
    tifffile.imwrite(tiff, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), photometric="rgb")
    assert (
        extract_patches.main([str(tiff), "--out", str(tmp_path / "o"), "--dataset", "x", "--group", "y"]) == 2
    )
    assert "pass --mpp" in one_error_line(capsys.readouterr().err)

    from PIL import Image

    from diffusion.command import run_cli
    from virtual_staining import embeddings

    mist = tmp_path / "MIST" / "HER2" / "TrainValAB"
    for side, names in (("trainA", ["000", "001"]), ("trainB", ["000"])):
        (mist / side).mkdir(parents=True)
        for n in names:
            Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(mist / side / f"{n}.png")
    rc = run_cli(embeddings.main, ["--dataset", "MIST", "--root", str(tmp_path / "MIST"), "--out",
                                              str(tmp_path / "cache.safetensors"), "--uni", "none"])  # fmt: skip
    assert rc == 2 and "unpaired images: 1 in" in one_error_line(capsys.readouterr().err)
