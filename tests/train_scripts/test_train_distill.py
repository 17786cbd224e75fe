"""train_scripts/train_distill.py end to end on CPU: a tiny teacher distilled on stored features (npy and packed),
exact resume, the LoRA student's few-kB adapter, and the student through tools.sample / tools.sample_4k with no
sampler flags (its folder records them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusion.command import run_cli
from diffusion.data.features import PACKED_DIRNAME, PackedShardWriter, packed_shard_path, write_packed_meta
from diffusion.model.loading import load_transformer
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.model.student import ADAPTER_FILE, SAMPLING_FILE
from diffusion.standins import random_pixcell
from diffusion.training.checkpoint import latest_checkpoint
from tests.helpers.paths import REPO
from train_scripts.train_distill import cli

TINY = str(REPO / "configs" / "distill" / "tiny.py")
C = 96


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny PixCell with a non-zero head (so guidance and distillation have something to act on)."""
    out = tmp_path_factory.mktemp("teacher")
    random_pixcell("PixCell-tiny-256", scale=0.02, caption_channels=C).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """Published layout: two 512 px patches with (32, 64, 64) VAE posteriors and (4, C) UNI tokens, npy and packed."""
    from diffusion.data.index import write_index

    root = tmp_path_factory.mktemp("distill_data") / "patches"
    rng = np.random.default_rng(0)
    names, arrays = [], []
    for i in range(2):
        rel = f"syn/demo/single_512/slide/0_{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(root / rel)
        vae = np.concatenate([rng.normal(size=(16, 64, 64)), np.full((16, 64, 64), 0.1)]).astype(np.float16)
        uni = rng.normal(size=(4, C)).astype(np.float16)
        np.save(root / rel.replace(".png", "_sd3_vae.npy"), vae)
        np.save(root / rel.replace(".png", "_uni.npy"), uni)
        names.append(rel)
        arrays.append((vae, uni))
    write_index(root / "metadata" / "patch_names_all.hdf5", {"syn_512": names})
    packed = root / PACKED_DIRNAME
    write_packed_meta(packed, "syn_512", len(names), 8, (32, 64, 64), (4, C))
    with PackedShardWriter(packed_shard_path(packed, "syn_512", 0), names, (32, 64, 64), (4, C)) as shard:
        for row, (vae, uni) in enumerate(arrays):
            shard.write(row, vae, uni)
    return root


def distill(work: Path, teacher: Path, data: Path, *options: str) -> int:
    argv = [TINY, "--work-dir", str(work), "--teacher", str(teacher), "--data-root", str(data)]
    return cli([*argv, "--cfg-options", *options] if options else argv)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, teacher, features, tiny_vae_dir) -> Path:
    work = tmp_path_factory.mktemp("full")
    assert distill(work, teacher, features, f"validation.vae={tiny_vae_dir}") == 0
    return work


def test_full_student_run(full_run, teacher):
    student_dir = full_run / "student"
    config = json.loads((student_dir / "config.json").read_text())
    assert config["guidance_embeds"] is True and config["_class_name"] == "PixCellTransformer2DModel"
    defaults = json.loads((student_dir / SAMPLING_FILE).read_text())
    assert (defaults["sampler"], defaults["steps"], defaults["guidance"]) == ("lcm", 4, 2.0)
    assert json.loads((full_run / SAMPLING_FILE).read_text())["sampler"] == "lcm"  # the work dir as a source
    student = load_transformer(student_dir)
    assert student.guidance_embedder.embedder.linear_2.weight.abs().sum() > 0  # it learned to use w
    base = load_transformer(teacher)
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, student.state_dict()[k])]
    assert moved  # the full student trains the teacher's weights too
    # The validation grid: rows of [real | teacher | student], one held-out condition of 256 px.
    grid = np.asarray(Image.open(full_run / "validation" / "step_0000002.png"))
    assert grid.shape == (256, 3 * 256, 3)
    assert not np.array_equal(grid[:, 256:512], grid[:, 512:])
    assert list((full_run / "tensorboard").rglob("events.*"))


def test_resume_by_rerunning_is_exact_and_reads_packed_features(
    tmp_path, teacher, features, full_run, tiny_vae_dir
):
    """Half the steps from packed shards, then the same command again: the checkpoint equals the straight run."""
    work = tmp_path / "resumed"
    val = f"validation.vae={tiny_vae_dir}"
    assert distill(work, teacher, features, val, "max_steps=2", "data.feature_format='packed'") == 0
    assert distill(work, teacher, features, val, "data.feature_format='packed'") == 0
    for folder in ("transformer", "transformer_ema"):
        a = load_file(latest_checkpoint(full_run) / folder / "diffusion_pytorch_model.safetensors")
        b = load_file(latest_checkpoint(work) / folder / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_lora_student_is_a_small_adapter_on_the_teacher(tmp_path, teacher, features):
    work = tmp_path / "lora"
    opts = ("student.kind='lora'", "student.lora_rank=4", "student.lora_alpha=4", "validation.every_steps=0")
    assert distill(work, teacher, features, *opts) == 0
    adapter = load_file(work / "student_lora" / ADAPTER_FILE)
    assert any(".lora_A." in k for k in adapter) and all(".lora_" in k or "guidance" in k for k in adapter)
    size = (work / "student_lora" / ADAPTER_FILE).stat().st_size
    assert size < 0.25 * sum(f.stat().st_size for f in teacher.glob("*.safetensors"))
    merged = load_transformer(work / "student_lora")  # teacher + adapter, merged
    full = load_transformer(work / "student")
    for k, v in full.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    base = load_transformer(teacher)
    changed = [k for k, v in base.state_dict().items() if not torch.allclose(v, merged.state_dict()[k])]
    assert changed and all(k.endswith(".weight") and ".attn" in k for k in changed)  # only the LoRA targets


def test_teacher_of_another_size_is_one_line(tmp_path, features, capsys):
    other = tmp_path / "t64"
    build_pixcell("PixCell-tiny-64", caption_channels=C).save_pretrained(other)
    assert distill(tmp_path / "w", other, features) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "does not match model PixCell-tiny-256" in err[0]
        and "sample_size 8 vs 32" in err[0]
    )


def test_student_samples_with_its_recorded_defaults(full_run, tiny_vae_dir, tmp_path):
    """tools.sample --model STUDENT needs no sampler flags: LCM, 4 steps, guidance 2 from sampling.json; the work dir
    (its latest checkpoint) and the exported folder give the same images; tools.sample_4k too."""
    from tools.sample import main as sample
    from tools.sample_4k import main as sample_4k

    np.save(tmp_path / "e.npy", np.random.default_rng(1).standard_normal((2, 1, C)).astype(np.float32))
    common = [
        "--vae",
        str(tiny_vae_dir),
        "--device",
        "cpu",
        "--no-progress",
        "--embeddings",
        str(tmp_path / "e.npy"),
    ]
    for name, model in (("dir", full_run / "student"), ("work", full_run)):
        assert run_cli(sample, ["--model", str(model), "--out", str(tmp_path / name), *common]) == 0
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert (run["sampler"], run["steps"], run["guidance"]) == ("lcm", 4, 2.0)
    a, b = (np.asarray(Image.open(tmp_path / n / "syn" / "e_000000.png")) for n in ("dir", "work"))
    assert np.array_equal(a, b)
    # --steps 1 changes the image; the recorded guidance is the student's input, so another w changes it too.
    assert (
        run_cli(sample, ["--model", str(full_run), "--out", str(tmp_path / "w3"), "--guidance", "3", *common])
        == 0
    )
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "w3" / "syn" / "e_000000.png")))

    np.save(tmp_path / "grid.npy", np.random.default_rng(2).standard_normal((2, 2, C)).astype(np.float32))
    argv = ["--model", str(full_run), "--vae", str(tiny_vae_dir), "--grid", str(tmp_path / "grid.npy"), "--out",
            str(tmp_path / "4k"), "--stride", "32", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert run_cli(sample_4k, argv) == 0
    run = json.loads((tmp_path / "4k" / "run.json").read_text())
    assert (run["sampler"], run["steps"]) == ("lcm", 4)
    assert np.asarray(Image.open(tmp_path / "4k" / "syn" / "grid.png")).shape == (512, 512, 3)


def test_multi_token_teacher_distils(tmp_path, features):
    """A 512 px teacher (4 UNI tokens, the PixCell-1024 token layout at a quarter of the size) distils too."""
    geometry = dict(patch_size=8, sample_size=64, interpolation_scale=1.0, caption_num_tokens=4)
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-256", caption_channels=C, **geometry)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "t512")
    overrides = "model_overrides=" + repr({"caption_channels": C, **geometry})
    opts = (overrides, "resolution=512", "max_steps=2", "validation.every_steps=0")
    assert distill(tmp_path / "w", tmp_path / "t512", features, *opts) == 0
    student = load_transformer(tmp_path / "w" / "student")
    assert student.config.caption_num_tokens == 4 and student.config.guidance_embeds
