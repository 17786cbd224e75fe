"""virtual_staining.stain (CLI) and VirtualStainer with tiny stand-ins: sizes, per-seed determinism, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.command import run_cli
from tests.helpers.vs_data import write_image
from virtual_staining.published import published_refs, resolve_weights
from virtual_staining.stain import main
from virtual_staining.stainer import SamplerSettings, VirtualStainer
from virtual_staining.tiny import build_tiny_parts

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_tiny_parts(tmp_path_factory.mktemp("vs_tiny"))


@pytest.fixture(scope="module")
def he_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("he")
    write_image(d / "a.png", 1024, 1)
    rng = np.random.default_rng(2)
    wide = Image.fromarray(rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)).resize(
        (2048, 1024), Image.BILINEAR
    )
    wide.save(d / "b_wide.png")  # 2048 x 1024: stained as two 1024 px units
    return d


def tiny_args(parts, *extra: str) -> list[str]:
    return [
        "--model", str(parts.transformer), "--vae", str(parts.vae), "--uni", str(parts.uni),
        "--lora", str(parts.lora), "--flow", str(parts.flow),
        "--steps", "2", "--flow-steps", "4", "--device", "cpu", "--dtype", "fp32", *extra,
    ]  # fmt: skip


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_stain_cli_sizes_and_determinism(parts, he_dir, tmp_path, capsys):
    out1, out2, out3 = tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"
    assert (
        run_cli(main, ["--input", str(he_dir), "--stain", "HER2", "--out", str(out1), *tiny_args(parts)]) == 0
    )
    assert "wrote 2 HER2 image(s)" in capsys.readouterr().out
    a, b = read_png(out1 / "a.png"), read_png(out1 / "b_wide.png")
    # tiny model: one 1024 px H&E unit -> one 128 px sample; a 2048 x 1024 image -> 256 x 128
    assert a.shape == (128, 128, 3) and b.shape == (128, 256, 3) and a.dtype == np.uint8
    assert not np.array_equal(b[:, :128], b[:, 128:])  # the two units differ (own tokens, own noise)
    # same seeds, another batch size (the wide image now in two passes): the same pixels up to float rounding
    # (batched kernels sum in another order: ~1e-6 before the uint8 rounding)
    argv = [
        "--input",
        str(he_dir),
        "--stain",
        "HER2",
        "--out",
        str(out2),
        "--batch-size",
        "1",
        *tiny_args(parts),
    ]
    assert run_cli(main, argv) == 0
    for name, ref in (("a.png", a), ("b_wide.png", b)):
        diff = np.abs(read_png(out2 / name).astype(int) - ref.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01
    # another seed: other pixels
    assert (
        run_cli(
            main,
            [
                "--input",
                str(he_dir / "a.png"),
                "--stain",
                "HER2",
                "--out",
                str(out3),
                "--seed",
                "7",
                *tiny_args(parts),
            ],
        )
        == 0
    )
    assert not np.array_equal(read_png(out3 / "a.png"), a)
    assert sorted(p.name for p in out3.iterdir()) == ["a.png"]  # nothing but the outputs (no temp files left)


def test_stainer_pieces(parts, tmp_path):
    st = VirtualStainer.from_sources(
        parts.transformer,
        parts.lora,
        parts.flow,
        parts.vae,
        parts.uni,
        settings=SamplerSettings(num_inference_steps=2, flow_steps=3),
    )
    x = torch.rand(1, 3, 1024, 1024)
    he = st.embed(x)
    assert he.shape == (1, 16, 96)
    ihc = st.translate(he)
    assert ihc.shape == he.shape and not torch.allclose(ihc, he)  # the stand-in flow moves the tokens
    y = st(x, seeds=[3])
    assert y.shape == (1, 3, 128, 128) and torch.equal(y, st(x, seeds=[3])) and 0 <= y.min() and y.max() <= 1
    no_lora = VirtualStainer.from_sources(
        parts.transformer,
        None,
        parts.flow,
        parts.vae,
        parts.uni,
        settings=SamplerSettings(num_inference_steps=2, flow_steps=3),
    )
    assert not torch.equal(no_lora(x, seeds=[3]), y)  # the adapter changes the samples
    # the same weights in the published file formats: the whole adapted transformer and the flow state dict
    # as torch .pth files
    torch.save(st.pipe.transformer.state_dict(), tmp_path / "mist_her2_lora.pth")
    torch.save(st.flow.state_dict(), tmp_path / "mist_her2_mlp.pth")
    published = VirtualStainer.from_sources(
        parts.transformer,
        tmp_path / "mist_her2_lora.pth",
        tmp_path / "mist_her2_mlp.pth",
        parts.vae,
        parts.uni,
        settings=SamplerSettings(num_inference_steps=2, flow_steps=3),
    )
    assert torch.equal(published(x, seeds=[3]), y)
    with pytest.raises(ValueError, match="multiples of 1024 px"):
        st(torch.rand(1, 3, 512, 1024))
    with pytest.raises(ValueError, match="seeds: expected 1"):
        st(x, seeds=[1, 2])


def test_stain_cli_errors_are_one_line(parts, he_dir, tmp_path, capsys):
    def err_of(argv) -> str:
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err
        return err

    write_image(tmp_path / "small.png", 512, 0)
    assert "small.png: 512x512 px; expected sides that are multiples of 1024" in err_of(
        [
            "--input",
            str(tmp_path / "small.png"),
            "--stain",
            "HER2",
            "--out",
            str(tmp_path / "o"),
            *tiny_args(parts),
        ]
    )
    assert "--input" in err_of(
        ["--input", str(tmp_path / "none"), "--stain", "ER", "--out", str(tmp_path / "o"), *tiny_args(parts)]
    )
    (tmp_path / "empty").mkdir()
    assert "no images" in err_of(
        ["--input", str(tmp_path / "empty"), "--stain", "ER", "--out", str(tmp_path / "o")]
    )
    # published weights cannot be fetched offline: one line that says what to pass instead
    args = [a for a in tiny_args(parts) if a not in (str(parts.lora), str(parts.flow), "--lora", "--flow")]
    err = err_of(["--input", str(he_dir / "a.png"), "--stain", "PR", "--out", str(tmp_path / "o"), *args])
    assert (
        "StonyBrook-CVLab/pixcell-virtual-staining:ckpts/lora/mist_pr_lora.pth" in err and "local file" in err
    )
    assert "no published weights for --dataset HER2Match --stain Ki67" in err_of(
        [
            "--input",
            str(he_dir / "a.png"),
            "--stain",
            "Ki67",
            "--dataset",
            "HER2Match",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert "--steps 0" in err_of(
        [
            "--input",
            str(he_dir),
            "--stain",
            "HER2",
            "--out",
            str(tmp_path / "o"),
            *tiny_args(parts),
            "--steps",
            "0",
        ]
    )


def test_published_references():
    lora, flow = published_refs("Ki67")
    assert lora == "StonyBrook-CVLab/pixcell-virtual-staining:ckpts/lora/mist_ki67_lora.pth"
    assert flow.endswith("ckpts/mlp/mist_ki67_mlp.pth")
    assert published_refs("HER2", "HER2Match")[0].endswith("her2match_lora.pth")
    with pytest.raises(FileNotFoundError, match="nor a hub reference"):
        resolve_weights("./missing.pth")
