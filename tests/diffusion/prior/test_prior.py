"""The UNI prior: it recovers a known distribution (a labelled mixture of Gaussians), saves and loads strictly,
trains under the real trainer with labels from the patch paths and resumes bit-exactly, and its errors are one
line (unknown label, a prior that does not fit the PixCell model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion.data.index import default_index_file, write_index
from diffusion.flow import flow_matching_loss
from diffusion.metrics.distances import frechet_distance_from_features
from diffusion.prior import UNIPrior, check_prior_fits, load_prior
from diffusion.prior.data import label_of, read_label_csv
from tests.helpers.paths import REPO

CFG = "configs/prior/tiny.py"
MODES = np.array([[4.0, 0.0, 0.0], [-2.0, 3.5, 0.0], [-2.0, -3.5, 1.0]])  # three well-separated modes in 3-d
SPREAD = 0.4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models


def mixture(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(MODES), n)
    return MODES[labels] + SPREAD * rng.standard_normal((n, MODES.shape[1])), labels


@pytest.fixture(scope="module")
def mog_prior() -> UNIPrior:
    """A labelled 1-token prior trained in-process on the mixture (the model and the loss, no trainer)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data, labels = mixture(4096, rng)
    prior = UNIPrior(num_tokens=1, channels=3, width=64, depth=3, labels=["a", "b", "c"])
    x_all = torch.tensor(data, dtype=torch.float32)
    prior.set_data_stats(x_all.mean(0), x_all.std(0))
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    y_all = torch.tensor(labels)
    for _ in range(700):
        idx = torch.randint(0, len(x_all), (256,), generator=gen)
        x1 = prior.standardise(x_all[idx])[:, None]
        y = torch.where(torch.rand(256, generator=gen) < 0.2, torch.full_like(y_all[idx], 3), y_all[idx])
        loss = flow_matching_loss(prior, torch.randn(x1.shape, generator=gen), x1, generator=gen, labels=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prior.eval()


def nearest_mode(x: np.ndarray) -> np.ndarray:
    return np.argmin(((x[:, None] - MODES[None]) ** 2).sum(-1), axis=1)


def test_prior_recovers_a_mixture_of_gaussians(mog_prior):
    rng = np.random.default_rng(1)
    real, _ = mixture(2000, rng)
    gen = torch.Generator().manual_seed(1)
    samples = mog_prior.sample(2000, steps=30, generator=gen)[:, 0].numpy()
    assert samples.shape == (2000, 3) and np.isfinite(samples).all()
    fd = frechet_distance_from_features(samples, real)
    noise_fd = frechet_distance_from_features(rng.standard_normal((2000, 3)), real)
    assert fd < 0.1 * noise_fd and fd < 0.8, (fd, noise_fd)
    # mode coverage: every mode gets about a third of the samples, and samples sit on the modes
    share = np.bincount(nearest_mode(samples), minlength=3) / len(samples)
    assert np.all(np.abs(share - 1 / 3) < 0.1), share
    dist = np.linalg.norm(samples - MODES[nearest_mode(samples)], axis=1)
    assert np.median(dist) < 3 * SPREAD


def test_label_conditional_sampling_hits_its_mode(mog_prior):
    for k, name in enumerate(["a", "b", "c"]):
        gen = [torch.Generator().manual_seed(100 * k + i) for i in range(300)]
        samples = mog_prior.sample(300, label=name, guidance=2.0, steps=30, generator=gen)[:, 0].numpy()
        assert (nearest_mode(samples) == k).mean() > 0.9, name


def test_per_sample_generators_make_samples_independent_of_the_batch(mog_prior):
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(6)]  # noqa: E731
    whole = mog_prior.sample(6, label="b", guidance=1.5, steps=5, generator=gens())
    part = mog_prior.sample(3, label="b", guidance=1.5, steps=5, generator=gens()[3:])
    torch.testing.assert_close(whole[3:], part, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 16])
def test_save_load_round_trip(tmp_path, tokens):
    torch.manual_seed(0)
    prior = UNIPrior(num_tokens=tokens, channels=8, width=32, depth=2, num_heads=4, labels=["lung", "skin"])
    for p in prior.parameters():  # non-zero head: a real round-trip check
        p.data.normal_(0, 0.1)
    prior.set_data_stats(torch.arange(8.0), torch.full((8,), 2.0))
    prior.save_pretrained(tmp_path / "p")
    back = load_prior(tmp_path / "p")
    assert back.labels == ["lung", "skin"] and back.num_tokens == tokens
    a, b = prior.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t = torch.randn(2, tokens, 8), torch.tensor([10.0, 500.0])
    torch.testing.assert_close(prior.eval()(x, t, torch.tensor([0, 2])), back(x, t, torch.tensor([0, 2])))


def test_one_line_errors(tmp_path):
    prior = UNIPrior(num_tokens=16, channels=8, width=32, depth=1, num_heads=4, labels=["lung"])
    with pytest.raises(ValueError, match=r"unknown label 'brain'; this prior knows: lung"):
        prior.sample(2, label="brain")
    with pytest.raises(
        ValueError, match=r"makes \(16, 8\) UNI tokens per sample, the PixCell model takes \(1, 8\)"
    ):
        check_prior_fits(prior, 1, 8)
    with pytest.raises(ValueError, match=r"takes \(16, 1536\)"):
        check_prior_fits(prior, 16, 1536)
    with pytest.raises(ValueError, match="trained without labels"):
        UNIPrior(num_tokens=1, channels=8, width=32, depth=1).sample(1, label="lung")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_prior(tmp_path)
    # weights of another size under a config: strict loading names the folder and the mismatch
    prior.save_pretrained(tmp_path / "p")
    UNIPrior(num_tokens=16, channels=8, width=64, depth=1, num_heads=4).save_pretrained(tmp_path / "q")
    (tmp_path / "q" / "diffusion_pytorch_model.safetensors").replace(
        tmp_path / "p" / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(ValueError, match=r"UNI prior .*p"):
        load_prior(tmp_path / "p")
    assert label_of("tcga/luad/single_1024/s1/0_0.jpeg", "cancer") == "luad"
    assert label_of("tcga/luad/single_1024/s1/0_0.jpeg", "dataset") == "tcga"
    (tmp_path / "l.csv").write_text("name,kind\nx,y\n")
    with pytest.raises(ValueError, match="columns patch,label"):
        read_label_csv(tmp_path / "l.csv")


# ---------------------------------------------------------------------- the trainer

C = 16


def make_patches(root: Path, n_per: int = 12) -> Path:
    """Published layout at 256 px (one token per patch): two cancers whose tokens sit apart; no images needed."""
    rng = np.random.default_rng(0)
    names = []
    for k, cancer in enumerate(("luad", "skcm")):
        for i in range(n_per):
            rel = f"tcga/{cancer}/single_256/slide{k}/{i}_0.png"
            path = root / rel.replace(".png", "_uni.npy")
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, (3.0 * k + rng.standard_normal((1, C))).astype(np.float16))
            names.append(rel)
    write_index(default_index_file(root), {"tcga_256": names})
    return root


def train(work_dir: Path, root: Path, *options: str, label_from: str | None = "cancer") -> int:
    from train_scripts import train_prior

    argv = [CFG, "--work-dir", str(work_dir), "--data-root", str(root)]
    if options:
        argv += ["--cfg-options", *options]
    if label_from:
        argv += ["--label-from", label_from]
    return train_prior.cli(argv)


def test_trainer_labels_exact_resume_and_export(tmp_path):
    root = make_patches(tmp_path / "patches")
    assert train(tmp_path / "a", root, "max_steps=6") == 0
    assert train(tmp_path / "b", root, "max_steps=4") == 0
    assert train(tmp_path / "b", root, "max_steps=6") == 0  # the same command again: resumes at step 4
    a = load_file(str(tmp_path / "a" / "prior" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "prior" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text()
    assert (tmp_path / "a" / "checkpoints" / "checkpoint-0000006").is_dir()
    prior = load_prior(tmp_path / "a")  # a work dir resolves to its exported prior/
    assert prior.labels == ["luad", "skcm"] and (prior.num_tokens, prior.channels) == (1, C)
    assert abs(float(prior.data_mean.mean()) - 1.5) < 0.5  # standardised on the two clusters (means 0 and 3)
    assert not torch.equal(
        a["res_blocks.0.out_layers.3.weight"], torch.zeros_like(a["res_blocks.0.out_layers.3.weight"])
    )
    assert prior.sample(3, label="skcm", steps=4).shape == (3, 1, C)


def test_trainer_errors_are_one_line(tmp_path, capsys):
    root = make_patches(tmp_path / "patches", n_per=4)
    assert train(tmp_path / "x", root, "prior.widht=3") == 2
    assert "unknown config key prior.'widht'" in capsys.readouterr().err
    assert train(tmp_path / "y", root, "resolution=1024") == 2
    assert "resolution 1024: expected a multiple of 256 up to data.parent_size 256" in capsys.readouterr().err
    assert train(tmp_path / "z", root, label_from="organ") == 2
    assert "--label-from organ: expected dataset or cancer" in capsys.readouterr().err
    (tmp_path / "labels.csv").write_text("patch,label\nother/x.png,lung\n")
    assert train(tmp_path / "w", root, label_from=str(tmp_path / "labels.csv")) == 2
    assert "none of its patches is in" in capsys.readouterr().err


# ---------------------------------------------------------------------- tools/sample.py --prior

UNI_C = 96  # the tiny UNI stand-in's embedding size (what the tiny PixCell models take)


@pytest.fixture(scope="module")
def pixcell_t1(tmp_path_factory) -> Path:
    """A tiny random PixCell with one UNI token (64 px images: the geometry does not matter here)."""
    from diffusion.model.pixcell_transformer import build_pixcell

    out = tmp_path_factory.mktemp("pixcell") / "t1"
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-64", caption_channels=UNI_C).eval()
    for p in model.parameters():  # a non-zero head, so conditions change the images
        p.data.normal_(0, 0.02)
    model.save_pretrained(out)
    return out


def saved_prior(path: Path, tokens: int = 1, channels: int = UNI_C) -> Path:
    torch.manual_seed(1)
    prior = UNIPrior(
        num_tokens=tokens, channels=channels, width=32, depth=1, num_heads=4, labels=["luad", "skcm"]
    )
    for p in prior.parameters():
        p.data.normal_(0, 0.1)
    prior.save_pretrained(path / "prior")  # as train_prior.py exports it into its work dir
    return path


def test_sample_tool_with_prior_end_to_end(pixcell_t1, tiny_vae_dir, tmp_path):
    import json

    from diffusion.command import run_cli
    from tools.sample import main

    work = saved_prior(tmp_path / "work")
    base = ["--model", str(pixcell_t1), "--vae", str(tiny_vae_dir), "--steps", "2", "--device", "cpu",
            "--no-progress", "--prior", str(work), "--prior-steps", "3", "--batch", "2"]  # fmt: skip
    out = tmp_path / "out"
    argv = base + ["--out", str(out), "--n-images", "3", "--label", "skcm", "--prior-guidance", "2"]
    assert run_cli(main, argv) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["prior_skcm_000000", "prior_skcm_000001", "prior_skcm_000002"]
    assert all(
        r["real"] is None and r["source"]["label"] == "skcm" and r["source"]["type"] == "prior" for r in rows
    )
    assert len({r["source"]["prior_seed"] for r in rows}) == 3 and not (out / "real").exists()
    run = json.loads((out / "run.json").read_text())
    assert (
        run["prior_label"] == "skcm" and run["prior_guidance"] == 2.0 and run["prior"].startswith("sha256:")
    )
    first = {p.name: p.read_bytes() for p in (out / "syn").iterdir()}
    assert len(first) == 3 and len(set(first.values())) == 3  # different conditions, different images
    # resume: a lost image is remade identically (its condition from its own noise), the rest kept
    (out / "syn" / "prior_skcm_000001.png").unlink()
    assert run_cli(main, argv) == 0
    assert {p.name: p.read_bytes() for p in (out / "syn").iterdir()} == first
    # another prior into the same folder is refused, not mixed in
    torch.manual_seed(5)
    UNIPrior(num_tokens=1, channels=UNI_C, width=32, depth=1, labels=["luad", "skcm"]).save_pretrained(
        tmp_path / "p2"
    )
    assert run_cli(main, [*argv, "--prior", str(tmp_path / "p2")]) == 2


def test_sample_tool_prior_errors_are_one_line(pixcell_t1, tiny_vae_dir, tmp_path, capsys):
    from diffusion.command import run_cli
    from tools.sample import main

    base = [
        "--model",
        str(pixcell_t1),
        "--vae",
        str(tiny_vae_dir),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "o"),
    ]

    def error(argv: list[str]) -> str:
        assert run_cli(main, argv) == 2
        # the last line (earlier ones: log warnings of the tiny 64 px model's geometry)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ")
        return err

    work = saved_prior(tmp_path / "w1")
    assert "unknown label 'brain'; this prior knows: luad, skcm" in error(
        base + ["--prior", str(work), "--n-images", "2", "--label", "brain"]
    )
    grid = saved_prior(tmp_path / "w16", tokens=16)
    err = error(base + ["--prior", str(grid), "--n-images", "2"])
    assert (
        f"--prior {grid}: the prior makes (16, {UNI_C}) UNI tokens per sample, the PixCell model takes (1, {UNI_C})"
        in err
    )
    wide = saved_prior(tmp_path / "w768", channels=768)
    assert f"takes (1, {UNI_C})" in error(base + ["--prior", str(wide), "--n-images", "2"])
    assert "--prior needs --n-images" in error(base + ["--prior", str(work)])
    assert "no such file or folder" in error(base + ["--prior", str(tmp_path / "none"), "--n-images", "2"])


# ---------------------------------------------------------------------- evaluation


def test_knn_precision_recall_and_bootstrap_fd():
    from diffusion.metrics.distances import frechet_distance_bootstrap
    from diffusion.prior.evaluation import knn_precision_recall, memorisation

    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 4))
    assert knn_precision_recall(real, real + 1e-6) == (1.0, 1.0)
    far = rng.standard_normal((300, 4)) + 50
    assert knn_precision_recall(real, far) == (0.0, 0.0)
    # a collapsed generator (one mode of the real set): precise, but low recall
    collapsed = real[real[:, 0] > 1.0] + 1e-3 * rng.standard_normal((int((real[:, 0] > 1.0).sum()), 4))
    p, r = knn_precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.4
    other = rng.standard_normal((300, 4)) + 0.5
    est = frechet_distance_bootstrap(real, other, n_boot=50)
    assert est.value == frechet_distance_from_features(real, other)  # the full-sample distance
    assert est.low < est.value < est.high and est.std > 0 and 0.5 < est.value < 2.0
    # copies of the training set are flagged, fresh draws are not
    train, heldout = rng.standard_normal((200, 4)), rng.standard_normal((200, 4))
    copied = memorisation(train[:100] + 1e-4, train, heldout)
    fresh = memorisation(rng.standard_normal((100, 4)), train, heldout)
    assert copied["nn_train_ratio"] < 0.01 and copied["near_copies"] == 1.0
    assert 0.7 < fresh["nn_train_ratio"] < 1.4 and fresh["near_copies"] < 0.1


def test_evaluate_prior_tool(tmp_path):
    import json

    from diffusion.command import run_cli
    from tools.evaluate_prior import main

    root = make_patches(tmp_path / "patches")
    assert train(tmp_path / "w", root, "max_steps=4") == 0
    out = tmp_path / "eval"
    argv = ["--prior", str(tmp_path / "w"), "--data-root", str(root), "--train-keys", "tcga_256", "--heldout-keys",
            "tcga_256", "--parent-size", "256", "--label-from", "cancer", "--n-samples", "40", "--n-boot", "10",
            "--prior-steps", "4", "--device", "cpu", "--out", str(out), "--no-progress"]  # fmt: skip
    assert run_cli(main, argv) == 0
    sets = json.loads((out / "metrics.json").read_text())["sets"]
    assert set(sets) == {"all", "luad", "skcm"}
    for m in sets.values():
        assert np.isfinite([m["fd"], m["fd_gaussian"], m["precision"], m["nn_train_ratio"]]).all()
        assert m["fd_low"] <= m["fd_high"] and m["n_samples"] == 40
        # the baselines' margins over the prior come from the same resamples as the distances themselves
        assert m["fd_gaussian_minus_fd"] == pytest.approx(m["fd_gaussian"] - m["fd"])
        assert m["fd_gaussian_minus_fd_low"] <= m["fd_gaussian_minus_fd_high"]
    assert "| all |" in (out / "report.md").read_text()


def test_every_prior_config_loads_and_builds():
    from diffusion.config import load_strict_config

    root = REPO / "configs"
    paths = sorted((root / "prior").glob("*.py")) + sorted((root / "demo").glob("prior_*.py"))
    assert len(paths) >= 4
    for path in paths:
        cfg = load_strict_config(path, root / "prior" / "_base_" / "prior.py")
        assert cfg.data.root is None and cfg.resolution % 256 == 0
        with torch.device("meta"):
            prior = UNIPrior((cfg.resolution // 256) ** 2, 1536, labels=["a"], **cfg.prior)
        assert prior.num_tokens in (1, 16)


def test_sample_images_python_entry(pixcell_t1, tiny_vae_dir, tmp_path):
    from diffusion.prior.sampling import sample_images
    from diffusion.sampling.pipeline import PixCellPipeline

    pipe = PixCellPipeline.from_parts(str(pixcell_t1), str(tiny_vae_dir))
    prior = load_prior(saved_prior(tmp_path / "w"))
    out = sample_images(pipe, prior, 2, label="luad", prior_steps=3, num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0), progress=False)  # fmt: skip
    assert out.images.shape == (2, 64, 64, 3) and out.conditions.shape == (2, 1, UNI_C)
    assert np.isfinite(out.images).all()
    with pytest.raises(ValueError, match=r"the PixCell model takes \(1, 96\)"):
        sample_images(pipe, load_prior(saved_prior(tmp_path / "g", tokens=16)), 1)
