"""tools.sample end to end on tiny random models: every condition source, real/syn pairing and the manifest,
resume after a kill, two accelerate processes against one, and the one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from diffusion.command import run_cli
from diffusion.data.features import PACKED_DIRNAME, PackedShardWriter, packed_shard_path, write_packed_meta
from diffusion.encoders import load_uni
from diffusion.model.loading import save_original_checkpoint
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.conditions import EmbeddingSource, IndexSource, name_seed
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.runner import as_images, initial_noise
from tests.helpers.paths import REPO
from tools.sample import main
from tools.sample_256 import main as main_256

C = 96  # the tiny UNI stand-in's embedding size


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for tiny models


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random transformers saved like released ones: t1 (T=1, 256 px), t64 (T=1, 64 px: cheap where the
    geometry does not matter), t16 (T=16, 128 px: the 1024 px token layout); t64 also as an original .pth."""
    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    paths = {}
    for name, preset in (
        ("t1", "PixCell-tiny-256"),
        ("t64", "PixCell-tiny-64"),
        ("t16", "PixCell-tiny-128-T16"),
    ):
        model = build_pixcell(preset, caption_channels=C).eval()
        for p in model.parameters():  # a non-zero head, so conditions and guidance change the images
            p.data.normal_(0, 0.02)
        model.save_pretrained(out / name)
        paths[name] = out / name
        if name == "t64":
            save_original_checkpoint(model, out / "t64.pth", as_ema=True)
            paths["t64.pth"] = out / "t64.pth"
    return paths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Published layout: two 512 px JPEG patches, (4, C) float16 features beside them, and the HDF5 index."""
    root = tmp_path_factory.mktemp("patches")
    rng = np.random.default_rng(0)
    names = []
    for rc in ("0_0", "0_1"):
        rel = f"ds/lihc/single_512/slideA/{rc}.jpeg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(root / rel, quality=90)
        np.save(root / rel.replace(".jpeg", "_uni.npy"), rng.standard_normal((4, C)).astype(np.float16))
        names.append(rel)
    (root / "metadata").mkdir()
    with h5py.File(root / "metadata" / "patch_names_all.hdf5", "w") as h5:
        h5.create_dataset("ds_512", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
    # The same features packed (the data module's shards, default <root>/features_packed).
    packed = root / PACKED_DIRNAME
    write_packed_meta(packed, "ds_512", len(names), 8, (32, 64, 64), (4, C))
    with PackedShardWriter(packed_shard_path(packed, "ds_512", 0), names, (32, 64, 64), (4, C)) as shard:
        for row, rel in enumerate(names):
            shard.write(
                row, np.zeros((32, 64, 64), np.float16), np.load(root / rel.replace(".jpeg", "_uni.npy"))
            )
    return root


def common(models, vae, out, model="t1") -> list[str]:
    return ["--model", str(models[model]), "--vae", str(vae), "--out", str(out), "--steps", "2", "--device", "cpu",
            "--no-progress"]  # fmt: skip


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_index_source_pairs_real_and_synthetic(models, tiny_vae_dir, dataset, tmp_path):
    index = dataset / "metadata" / "patch_names_all.hdf5"
    out = tmp_path / "out"
    argv = common(models, tiny_vae_dir, out) + ["--index", str(index), "--n-images", "3", "--batch", "2"]
    assert run_cli(main, argv) == 0
    rows = manifest(out)
    assert len(rows) == 3 and len({r["name"] for r in rows}) == 3
    for r in rows:
        syn, real = out / r["syn"], out / r["real"]
        assert syn.name == real.name and syn.suffix == ".png"
        assert np.asarray(Image.open(syn)).shape == (256, 256, 3)
        # The real file is exactly the crop of the source patch it was conditioned on (PNG: lossless).
        y, x = r["source"]["crop"]
        patch = np.asarray(Image.open(dataset / r["source"]["patch"]).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(real)), patch[y : y + 256, x : x + 256])
        assert r["seed"] == name_seed(0, r["name"]) and r["steps"] == 2 and r["guidance"] == 2.0
        assert r["sampler"] == "dpm-solver" and r["model"].startswith("sha256:")
    # The tokens of a crop are its sub-grid of the patch's (row-major) feature grid.
    src = IndexSource(1, 256, C, index_file=index)
    specs = src.specs()
    assert len(specs) == 8  # 2 patches x 4 crops of 256 px
    spec = next(s for s in specs if s.y == 1 and s.x == 0)
    feats = np.load(dataset / spec.entry.replace(".jpeg", "_uni.npy")).astype(np.float32)
    assert np.array_equal(src.load(spec).tokens.reshape(-1), feats[2])


def test_packed_features_give_the_same_images(models, tiny_vae_dir, dataset, tmp_path):
    index = str(dataset / "metadata" / "patch_names_all.hdf5")
    for fmt in ("npy", "packed"):
        argv = common(models, tiny_vae_dir, tmp_path / fmt) + ["--index", index, "--n-images", "2"]
        assert run_cli(main, [*argv, "--features", fmt]) == 0
    _same_tree(tmp_path / "npy" / "syn", tmp_path / "packed" / "syn")
    npy, packed = (IndexSource(1, 256, C, index_file=index, features=f) for f in ("npy", "packed"))
    spec = npy.specs()[7]
    assert np.array_equal(npy.load(spec).tokens, packed.load(spec).tokens)


def test_listed_patches_give_every_crop(models, tiny_vae_dir, dataset, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("ds/lihc/single_512/slideA/0_1.jpeg\n")
    out = tmp_path / "out"
    argv = common(models, tiny_vae_dir, out) + ["--patches", str(listing), "--data-root", str(dataset)]
    assert run_cli(main_256, argv) == 0  # the alias: same tool, another default model
    names = sorted(p.name for p in (out / "syn" / "ds/lihc/single_512/slideA").iterdir())
    assert names == [f"0_1_y{y}_x{x}.png" for y in (0, 256) for x in (0, 256)]
    assert sorted(p.name for p in (out / "real" / "ds/lihc/single_512/slideA").iterdir()) == names


def test_unusable_patches_are_skipped_and_counted(models, tiny_vae_dir, dataset, tmp_path, caplog, capsys):
    """A patch listed in the index whose features are missing: logged and counted, a hard stop past --max-skips."""
    names = ["ds/lihc/single_512/slideA/0_0.jpeg", "ds/lihc/single_512/slideA/9_9.jpeg"]  # 9_9: no files
    index = tmp_path / "metadata" / "patch_names_all.hdf5"
    index.parent.mkdir()
    with h5py.File(index, "w") as h5:
        h5.create_dataset("ds_512", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
    base = common(models, tiny_vae_dir, tmp_path / "out") + [
        "--index",
        str(index),
        "--data-root",
        str(dataset),
    ]
    assert run_cli(main, base + ["--keys", "ds", "--max-skips", "4", "--batch", "4"]) == 0  # `ds` -> ds_512
    assert len(manifest(tmp_path / "out")) == 4
    assert "skipped (4 so far)" in caplog.text and "9_9_uni.npy: feature file missing" in caplog.text
    assert run_cli(main, base + ["--max-skips", "3", "--batch", "4", "--out", str(tmp_path / "o2")]) == 2
    assert "more than 3 conditions could not be used" in capsys.readouterr().err


def test_image_folder_source_embeds_on_the_fly(models, tiny_vae_dir, tiny_uni_dir, tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (512, 256, 3), dtype=np.uint8)).save(folder / "sub" / "b.png")
    out = tmp_path / "out"
    argv = common(models, tiny_vae_dir, out) + [
        "--images",
        str(folder),
        "--uni",
        str(tiny_uni_dir),
        "--format",
        "jpeg",
    ]
    assert run_cli(main, argv) == 0
    assert sorted(r["name"] for r in manifest(out)) == ["a", "sub/b_y0_x0", "sub/b_y256_x0"]
    assert (out / "syn" / "sub" / "b_y256_x0.jpg").is_file() and (out / "real" / "a.jpg").is_file()
    # Tokens on the fly: one UNI embedding per 256 px tile, row-major, as embed_grid computes them.
    uni = load_uni(tiny_uni_dir)
    image = np.array(Image.open(folder / "sub" / "b.png"))
    tokens = uni.embed_grid(as_images([image]))  # uint8, as the runner calls it
    ref = uni.embed_grid(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    assert tokens.shape == (1, 2, C) and torch.allclose(tokens, ref, atol=1e-5)


def test_embedding_files_and_their_shapes(models, tiny_vae_dir, tmp_path):
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((2, 16, C)).astype(np.float32)
    np.save(tmp_path / "e16.npy", emb)
    out = tmp_path / "out"
    assert (
        run_cli(main, common(models, tiny_vae_dir, out, "t16") + ["--embeddings", str(tmp_path / "e16.npy")])
        == 0
    )
    assert [r["name"] for r in manifest(out)] == ["e16_000000", "e16_000001"]
    assert all(r["real"] is None for r in manifest(out)) and not (out / "real").exists()
    # (N, 16, C) at a T=1 model: each token grid is cut into 16 conditions; named tensors keep their names.
    src = EmbeddingSource(1, 256, tmp_path / "e16.npy", C)
    assert len(src.specs()) == 32 and np.array_equal(src.load(src.specs()[5]).tokens.reshape(-1), emb[0, 5])
    save_file({"alpha": emb[0, :1], "beta": emb[1, 0]}, tmp_path / "named.safetensors")
    assert [s.name for s in EmbeddingSource(1, 256, tmp_path / "named.safetensors", C).specs()] == [
        "alpha",
        "beta",
    ]


def test_bad_inputs_are_one_line_errors(models, tiny_vae_dir, dataset, tmp_path, capsys):
    def error(argv) -> str:
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err
        return err

    base = common(models, tiny_vae_dir, tmp_path / "o", "t64")
    np.save(tmp_path / "e1.npy", np.zeros((3, 1, C), np.float32))
    # A T=1 embedding for the T=16 model, and a wrong embedding dim.
    err = error(
        common(models, tiny_vae_dir, tmp_path / "o", "t16") + ["--embeddings", str(tmp_path / "e1.npy")]
    )
    assert "e1.npy" in err and f"(N, 16, {C})" in err
    np.save(tmp_path / "e_dim.npy", np.zeros((3, 1, 768), np.float32))
    assert "UNI dim is 96" in error(base + ["--embeddings", str(tmp_path / "e_dim.npy")])
    nan = np.zeros((2, 1, C), np.float32)
    nan[1, 0, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    assert "NaN" in error(base + ["--embeddings", str(tmp_path / "nan.npy")])
    # A missing image, a missing index, an unreadable checkpoint, two sources at once.
    err = error(base + ["--images", str(tmp_path / "missing.png")])
    assert err.startswith("error: --images") and "missing.png: no such file or folder" in err
    assert "no such file" in error(base + ["--index", str(tmp_path / "none.hdf5")])
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    argv = ["--model", str(tmp_path / "broken.pth"), "--vae", str(tiny_vae_dir), "--out", str(tmp_path / "o")]
    assert "broken.pth" in error(argv + ["--embeddings", str(tmp_path / "e1.npy")])
    assert "exactly one" in error(base + ["--embeddings", "a.npy", "--images", "b"])
    index = str(dataset / "metadata" / "patch_names_all.hdf5")
    at256 = common(models, tiny_vae_dir, tmp_path / "o", "t1")
    assert "only 8 crops" in error(at256 + ["--index", index, "--n-images", "9"])
    assert "no dataset key 'nope'" in error(at256 + ["--index", index, "--keys", "nope"])
    # Rerunning into a folder made with other settings is refused rather than mixing images.
    assert run_cli(main, base + ["--embeddings", str(tmp_path / "e1.npy")]) == 0
    assert "guidance: 2.0 there, 3.0 now" in error(
        base + ["--embeddings", str(tmp_path / "e1.npy"), "--guidance", "3"]
    )


def test_original_checkpoint_and_guidance_interval(models, tiny_vae_dir, tmp_path):
    np.save(tmp_path / "e.npy", np.random.default_rng(3).standard_normal((1, 1, C)).astype(np.float32))
    outs = []
    for i, extra in enumerate(([], ["--guidance-interval", "0", "999"], ["--guidance-interval", "0", "100"])):
        out = tmp_path / f"o{i}"
        argv = common(models, tiny_vae_dir, out, "t64") + ["--embeddings", str(tmp_path / "e.npy"), *extra]
        if i == 0:
            argv[1] = str(models["t64.pth"])  # the same weights as an original (EMA) checkpoint
        assert run_cli(main, argv) == 0
        outs.append(np.asarray(Image.open(out / "syn" / "e_000000.png")))
    assert np.array_equal(outs[0], outs[1])  # an interval covering every step is plain guidance
    assert not np.array_equal(outs[0], outs[2])  # guidance off for most steps changes the image
    assert manifest(tmp_path / "o2")[0]["guidance_interval"] == [0.0, 100.0]


@pytest.mark.parametrize("sampler", ["sa-solver", "ddpm"])
def test_stochastic_samplers_draw_per_image_noise(sampler, tiny_vae_dir):
    """With per-image generators an image does not depend on its batch mates, even for stochastic samplers."""
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-64").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    pipe = PixCellPipeline.from_parts(model, tiny_vae_dir, sampler)
    cond = torch.randn(2, 1, 1536, generator=torch.Generator().manual_seed(1))
    kw = dict(guidance_scale=2.0, num_inference_steps=3, output_type="latent", progress=False)
    noise, gens = initial_noise([11, 12], (16, 8, 8))
    both = pipe(cond, latents=noise, generator=gens, **kw).images
    noise, gens = initial_noise([12], (16, 8, 8))
    alone = pipe(cond[1:], latents=noise, generator=gens, **kw).images
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    _, other = initial_noise([13], (16, 8, 8))  # same start, another generator: the sampler's noise differs
    assert not torch.allclose(alone, pipe(cond[1:], latents=noise, generator=other, **kw).images, atol=1e-3)


#################################################################################
#               Real processes: a kill and resume, two accelerate processes    #
#################################################################################


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _clean_run(argv: list[str]) -> None:
    """One uninterrupted in-process run (one thread: `one_thread`), the reference for the subprocess runs."""
    assert run_cli(main, argv) == 0


@pytest.fixture(scope="module")
def twelve(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("twelve")
    np.save(root / "e.npy", np.random.default_rng(4).standard_normal((12, 1, C)).astype(np.float32))
    return root


def _argv(models, vae, root: Path, out: str, model: str) -> list[str]:
    return common(models, vae, root / out, model) + ["--embeddings", str(root / "e.npy"), "--batch", "2"]


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_resume_after_kill_is_byte_identical(models, tiny_vae_dir, twelve):
    _clean_run(_argv(models, tiny_vae_dir, twelve, "clean", "t1"))
    argv = _argv(models, tiny_vae_dir, twelve, "killed", "t1")
    out, root = twelve / "killed", twelve
    proc = subprocess.Popen([sys.executable, "-m", "tools.sample", *argv], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "syn").glob("*.png")):
        assert proc.poll() is None, "the sampler ended before it could be killed"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = len(list((out / "syn").glob("*.png")))
    assert 0 < done < 12, done
    assert run_cli(main, argv) == 0  # the same command again finishes the run
    assert not list((out / "syn").glob(".*.tmp"))  # the killed run's temporary files are cleaned
    _same_tree(root / "clean" / "syn", out / "syn")
    assert (root / "clean" / "manifest.jsonl").read_text() == (out / "manifest.jsonl").read_text()


def test_two_accelerate_processes_equal_one(models, tiny_vae_dir, twelve):
    _clean_run(_argv(models, tiny_vae_dir, twelve, "clean64", "t64"))
    argv = _argv(models, tiny_vae_dir, twelve, "two", "t64")
    out, root = twelve / "two", twelve
    env = {**_env(), "ACCELERATE_USE_CPU": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    res = subprocess.run([*launch, "-m", "tools.sample", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "process 0/2: 6 images" in log and "process 1/2: 6 images" in log  # two real processes, disjoint
    _same_tree(root / "clean64" / "syn", out / "syn")
    assert (root / "clean64" / "manifest.jsonl").read_text() == (out / "manifest.jsonl").read_text()


def test_cell_masks_through_the_same_sampling_path(models, tiny_vae_dir, tmp_path, capsys):
    """--controlnet/--masks: one mask per image by name, the layout follows the mask, errors are one line."""
    from safetensors.torch import save_file as save_tensors

    from diffusion.model.controlnet import PixCellControlNet
    from diffusion.model.loading import load_transformer

    base = load_transformer(models["t64"])
    controlnet = PixCellControlNet.from_transformer(base, n_controlnet_blocks=2)
    for p in controlnet.parameters():  # non-zero: an untrained (zero-init) ControlNet changes nothing
        p.data.normal_(0, 0.05)
    controlnet.save_pretrained(tmp_path / "cn")
    emb = np.random.default_rng(3).standard_normal((2, 1, C)).astype(np.float32)
    save_tensors({"a": torch.from_numpy(emb[0]), "b": torch.from_numpy(emb[1])}, tmp_path / "uni.safetensors")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(masks / "a.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "b.png")
    args = common(models, tiny_vae_dir, tmp_path / "out", "t64") + [
        "--embeddings", str(tmp_path / "uni.safetensors"), "--controlnet", str(tmp_path / "cn"),
        "--masks", str(masks), "--seed", "5",
    ]  # fmt: skip
    assert run_cli(main, args) == 0
    a = np.asarray(Image.open(tmp_path / "out" / "syn" / "a.png"))
    assert a.shape == (64, 64, 3)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["controlnet_scale"] == 1.0
    # Swap the masks: each image follows its own mask by name.
    (masks / "a.png").rename(masks / "tmp.png")
    (masks / "b.png").rename(masks / "a.png")
    (masks / "tmp.png").rename(masks / "b.png")
    args[args.index(str(tmp_path / "out"))] = str(tmp_path / "swapped")
    assert run_cli(main, args) == 0
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "swapped" / "syn" / "a.png")))
    # Scale 0 is the base model: the same image as sampling without the ControlNet.
    base_args = common(models, tiny_vae_dir, tmp_path / "base", "t64") + [
        "--embeddings", str(tmp_path / "uni.safetensors"), "--seed", "5"]  # fmt: skip
    assert run_cli(main, base_args) == 0
    args[args.index(str(tmp_path / "swapped"))] = str(tmp_path / "zero")
    assert run_cli(main, args + ["--controlnet-scale", "0"]) == 0
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "zero" / "syn" / "b.png")),
        np.asarray(Image.open(tmp_path / "base" / "syn" / "b.png")),
    )
    capsys.readouterr()
    (masks / "b.png").unlink()
    assert run_cli(main, args + ["--controlnet-scale", "0.5"]) == 2
    assert "no mask for b" in capsys.readouterr().err
    assert run_cli(main, common(models, tiny_vae_dir, tmp_path / "x", "t64") + [
        "--embeddings", str(tmp_path / "uni.safetensors"), "--masks", str(masks)]) == 2  # fmt: skip
    assert "--controlnet and --masks go together" in capsys.readouterr().err
