"""The one LoRA trainer (train_scripts/train_lora.py) on tiny features: adapter-only checkpoints, bit-exact resume,
the adapter in tools/sample.py, merge-and-export equal to adapter-on-base, configs and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion.config import load_strict_config, shipped_config
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.pipeline import PixCellPipeline
from tests.helpers.features import write_random_features
from tests.helpers.paths import REPO
from train_scripts.train_lora import SCHEMAS, cli

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models

TINY = str(REPO / "configs" / "lora" / "tiny.py")


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """Four random 512 px 'patches' in the published npy layout (16 crops of 256 px), 96-d UNI tokens."""
    return write_random_features(tmp_path_factory.mktemp("lora_features") / "patches", 4, 512, "syn_512")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny PixCell-256 for the 96-d UNI stand-in, random non-zero weights, as a diffusers folder."""
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-256", caption_channels=96)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("lora_base")
    model.save_pretrained(out)
    return out


def train(work: Path, features: Path, base: Path, *options: str) -> int:
    argv = [TINY, "--load-from", str(base), "--work-dir", str(work), "--data-root", str(features)]
    return cli(argv + (["--cfg-options", *options] if options else []))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, features, base) -> Path:
    work = tmp_path_factory.mktemp("lora_straight")
    assert train(work, features, base, "max_steps=3") == 0
    return work


def test_resume_is_bit_exact_and_checkpoints_hold_only_the_adapter(straight, features, base, tmp_path):
    assert train(tmp_path, features, base, "max_steps=2") == 0
    assert train(tmp_path, features, base, "max_steps=3") == 0  # the same command again: resumes at step 2
    assert "resumed from" in (tmp_path / "train.log").read_text()
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(tmp_path / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # rank 2 on self-attention, cross-attention and feed-forward of both blocks: (4 + 4 + 2) x 2 layers x A, B
    assert len(a) == 40 and {k.split(".")[3] for k in a} == {"attn1", "attn2", "ff"}
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in a.items())  # it trained
    saved = load_file(str(tmp_path / "checkpoints" / "checkpoint-0000002" / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # accelerate's model file: the adapter only


def test_adapter_in_tools_sample_and_merged_export_equal_adapter_on_base(
    straight, base, tiny_vae_dir, tmp_path
):
    from tools.export_pipeline import main as export
    from tools.sample import main as sample

    lora = straight / "lora.safetensors"
    np.save(tmp_path / "uni.npy", np.random.default_rng(1).normal(size=(2, 1, 96)).astype(np.float32))
    common = ["--model", str(base), "--vae", str(tiny_vae_dir), "--embeddings", str(tmp_path / "uni.npy"),
              "--steps", "3", "--device", "cpu", "--dtype", "fp32", "--no-progress"]  # fmt: skip
    assert sample([*common, "--lora", str(lora), "--out", str(tmp_path / "lora")]) == 0
    assert sample([*common, "--lora", str(lora), "--lora-scale", "0", "--out", str(tmp_path / "zero")]) == 0
    assert sample([*common, "--out", str(tmp_path / "plain")]) == 0

    def images(run: str) -> list[np.ndarray]:
        from PIL import Image

        return [np.asarray(Image.open(p)) for p in sorted((tmp_path / run / "syn").glob("*.png"))]

    with_lora, zero, plain = images("lora"), images("zero"), images("plain")
    assert len(with_lora) == 2 and all(np.array_equal(z, p) for z, p in zip(zero, plain))  # scale 0: the base
    assert not all(np.array_equal(a, p) for a, p in zip(with_lora, plain))

    # merge-and-export: a plain diffusers folder whose samples equal adapter-on-base within float tolerance
    scale = 0.7
    assert export([str(base), str(tmp_path / "merged"), "--vae", str(tiny_vae_dir), "--lora", str(lora),
                   "--lora-scale", str(scale)]) == 0  # fmt: skip
    merged = PixCellPipeline.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in k for k in merged.transformer.state_dict())
    adapted = PixCellPipeline.from_parts(base, tiny_vae_dir)
    adapted.load_lora_weights(lora, scale=scale)
    uni, latents = torch.randn(2, 1, 96), torch.randn(2, 16, 32, 32)
    kw = dict(num_inference_steps=3, latents=latents, output_type="latent", progress=False)
    a, m = adapted(uni, **kw).images, merged(uni, **kw).images
    plain_out = PixCellPipeline.from_parts(base, tiny_vae_dir)(uni, **kw).images
    assert torch.allclose(a, m, atol=1e-4, rtol=1e-4)
    assert (a - plain_out).abs().max() > 100 * (a - m).abs().max()  # the tolerance is far below the effect


def test_lora_configs_load_and_errors_are_one_line(features, base, tmp_path, capsys):
    for path in sorted((REPO / "configs" / "lora").glob("*.py")):
        cfg = load_strict_config(path, shipped_config(SCHEMAS["features"]))
        assert cfg.task == "features" and cfg.data.root is None
    assert train(tmp_path / "a", features, base, "lora.rnak=3") == 2
    assert "unknown config key lora.'rnak'" in capsys.readouterr().err
    assert cli([TINY, "--work-dir", str(tmp_path / "b"), "--data-root", str(features)]) == 2
    assert "pass --load-from" in capsys.readouterr().err
    assert train(tmp_path / "c", features, base, "lora.targets=['attn3.to_q']") == 2
    assert "no module named attn3.to_q" in capsys.readouterr().err
    other = build_pixcell("PixCell-tiny-256")  # 1536-d UNI: does not fit the 96-d features
    other.save_pretrained(tmp_path / "other")
    assert train(tmp_path / "d", features, tmp_path / "other") == 2
    assert "UNI features of shape (1, 96)" in capsys.readouterr().err
    assert cli([TINY, "--load-from", str(base), "--work-dir", str(tmp_path / "e"), "--data-root", str(features),
                "--stain", "HER2"]) == 2  # fmt: skip
    assert "--stain: only for virtual-staining configs" in capsys.readouterr().err
