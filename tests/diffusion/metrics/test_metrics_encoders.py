"""Image folders, encoder specs and the one loader for feature encoders (tiny random stand-ins, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.encoders import load_uni
from diffusion.metrics.encoders import (
    FEATURE_ENCODERS,
    load_feature_encoder,
    parse_encoder_spec,
)
from diffusion.metrics.features import embed_images
from diffusion.metrics.images import check_paired, content_hash, list_images, read_rgb
from diffusion.metrics.inception import (
    INCEPTION_FILE,
    find_inception,
    load_inception,
)
from diffusion.standins import build_tiny_inception, build_tiny_timm_encoder


def _write_images(folder, n, seed=0, size=48, suffix=".png", names=None):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = names[i] if names else f"{i:03d}"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{name}{suffix}")
    return folder


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    return build_tiny_timm_encoder(tmp_path_factory.mktemp("tiny_vit"))


#################################################################################
#                                 Image folders                                 #
#################################################################################


def test_list_images_formats_subfolders_and_keys(tmp_path):
    _write_images(tmp_path / "a", 2, suffix=".png")
    _write_images(tmp_path / "a" / "slide1", 1, suffix=".jpg", names=["7_3"])
    _write_images(tmp_path / "a", 1, suffix=".tif", names=["t"])
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _write_images(tmp_path / "a" / ".hidden", 1)
    folder = list_images(tmp_path / "a", "REAL")
    assert folder.keys == ("000", "001", "slide1/7_3", "t")
    assert all(read_rgb(f).shape == (48, 48, 3) for f in folder.files)


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="REAL .*no such folder"):
        list_images(tmp_path / "missing", "REAL")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"SYN .*empty: no images"):
        list_images(tmp_path / "empty", "SYN")
    _write_images(tmp_path / "dup", 1, names=["x"])
    _write_images(tmp_path / "dup", 1, names=["x"], suffix=".jpg")
    with pytest.raises(ValueError, match="share the name 'x'"):
        list_images(tmp_path / "dup", "REAL")


def test_check_paired_names_the_missing_twins(tmp_path):
    real = list_images(_write_images(tmp_path / "r", 3, names=["a", "b", "c"]), "REAL")
    syn = list_images(_write_images(tmp_path / "s", 3, names=["a", "b", "z"]), "SYN")
    with pytest.raises(
        ValueError, match=r"cos_uni2 .*1 REAL image\(s\) have no twin in SYN \(e.g. c\).*e.g. z"
    ):
        check_paired(real, syn, "cos_uni2")
    check_paired(real, real, "cos_uni2")  # same names: fine


def test_read_rgb_names_broken_files(tmp_path):
    good = _write_images(tmp_path, 1, names=["good"]) / "good.png"
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    for bad in (truncated, empty, fake):
        with pytest.raises(ValueError, match=f"{bad.name}: cannot read image"):
            read_rgb(bad)


def test_content_hash_tracks_bytes_and_names(tmp_path):
    folder = _write_images(tmp_path / "f", 3)
    h = content_hash(list_images(folder), progress=False)
    assert content_hash(list_images(folder), progress=False) == h
    (folder / "001.png").rename(folder / "009.png")
    renamed = content_hash(list_images(folder), progress=False)
    assert renamed != h
    _write_images(folder, 1, seed=99, names=["000"])  # same name, new pixels
    assert content_hash(list_images(folder), progress=False) not in (h, renamed)


#################################################################################
#                                  Encoder specs                                #
#################################################################################


def test_parse_presets_and_overrides():
    assert parse_encoder_spec("uni2") == FEATURE_ENCODERS["uni2"]
    spec = parse_encoder_spec("hoptimus0=/w/H-optimus-0,size=256")
    assert spec.source == "/w/H-optimus-0" and spec.input_size == 256
    assert spec.mean == FEATURE_ENCODERS["hoptimus0"].mean  # the preset's preprocessing is kept
    assert spec.model_args["init_values"] == 1e-5
    spec = parse_encoder_spec(
        'mine=/ckpt.pth,arch=vit_small_patch16_224,mean=0.5/0.4/0.3,pool=cls,global_pool=""'
    )
    assert (spec.arch, spec.mean, spec.pool) == ("vit_small_patch16_224", (0.5, 0.4, 0.3), "cls")
    assert spec.model_args == {"global_pool": ""} and spec.input_size is None


@pytest.mark.parametrize(
    "text,message",
    [
        ("mine", "not a preset"),
        ("bad name=x", "expected NAME=SOURCE"),
        ("mine=x,pool=max", "pool='max'"),
        ("mine=x,mean=0.5/0.5", "three numbers"),
        ("mine=x,size=-3", "positive integer"),
        ("mine=x,novalue", "not key=value"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_encoder_spec(text)


#################################################################################
#                                 Loading encoders                              #
#################################################################################


def test_tiny_timm_encoder_loads_with_its_own_preprocessing(tiny_vit_dir):
    ext = load_feature_encoder(f"tiny={tiny_vit_dir},pool=cls+mean")
    assert ext.dim == 64  # class token + mean of patch tokens, 32 each
    assert (ext.info["input_size"], ext.info["mean"]) == (32, [0.7, 0.58, 0.7])  # from config.json
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    feats = ext.model(images)
    assert feats.shape == (3, 64) and torch.isfinite(feats).all()
    cls = load_feature_encoder(f"tiny={tiny_vit_dir},pool=cls").model(images)
    mean = load_feature_encoder(f"tiny={tiny_vit_dir},pool=mean").model(images)
    torch.testing.assert_close(feats, torch.cat([cls, mean], dim=1))
    # the spec's preprocessing wins over the folder's and changes both features and the cache identity
    other = load_feature_encoder(f"tiny={tiny_vit_dir},pool=cls+mean,mean=0.5/0.5/0.5")
    assert not torch.allclose(other.model(images), feats)
    assert other.fingerprint != ext.fingerprint


def test_bare_weights_file_with_arch_matches_folder(tiny_vit_dir):
    import json

    cfg = json.loads((tiny_vit_dir / "config.json").read_text())
    args = ",".join(f"{k}={json.dumps(v)}" for k, v in cfg["model_args"].items())
    spec = f"f={tiny_vit_dir / 'model.safetensors'},arch={cfg['architecture']},size=32,mean=0.7/0.58/0.7,std=0.21/0.23/0.18,pool=cls,{args}"
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    a = load_feature_encoder(spec)
    b = load_feature_encoder(f"g={tiny_vit_dir},pool=cls")
    torch.testing.assert_close(a.model(images), b.model(images))
    assert a.fingerprint == b.fingerprint  # same weights and preprocessing: same cache entries, any name/path


def test_uni2_goes_through_load_uni(tiny_uni_dir):
    ext = load_feature_encoder(f"uni2={tiny_uni_dir}")
    images = torch.rand(2, 3, 256, 256)
    torch.testing.assert_close(ext.model(images), load_uni(tiny_uni_dir)(images))
    assert ext.info["mean"] == [0.485, 0.456, 0.406] and ext.dim == 96


def test_loader_errors(tmp_path, tiny_vit_dir):
    with pytest.raises(ValueError, match="returns .*tokens.*pool=cls"):
        load_feature_encoder(f"t={tiny_vit_dir}").model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="bare weights file; add arch="):
        load_feature_encoder(f"t={tiny_vit_dir / 'model.safetensors'}")
    with pytest.raises(FileNotFoundError, match="not a file, folder, hf-hub: id or timm model"):
        load_feature_encoder(f"t={tmp_path / 'nothing'}")
    with pytest.raises(ValueError, match="cannot build vit_small_patch16_224"):  # weights of another model
        load_feature_encoder(f"t={tiny_vit_dir / 'model.safetensors'},arch=vit_small_patch16_224")
    (tmp_path / "noweights").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_feature_encoder(f"t={tmp_path / 'noweights'},arch=vit_tiny_patch16_224")
    with pytest.raises(
        RuntimeError, match=r"cannot load hf-hub:bioptimus/H-optimus-0 .*--encoder hoptimus0="
    ):
        load_feature_encoder("hoptimus0")  # offline in tests
    with pytest.raises(RuntimeError, match=r"cannot load hf-hub:MahmoodLab/UNI2-h .*--encoder uni2=PATH"):
        load_feature_encoder("uni2")
    with pytest.raises(FileNotFoundError, match="--encoder uni2=PATH"):
        load_feature_encoder(f"uni2={tmp_path / 'no_uni'}")


def test_embed_images_rows_follow_files_and_mixed_sizes(tmp_path, tiny_vit_dir):
    folder = _write_images(tmp_path / "f", 4, size=40)
    _write_images(folder, 1, size=64, names=["big"])
    images = list_images(folder)
    ext = load_feature_encoder(f"t={tiny_vit_dir},pool=mean")
    feats = embed_images(ext, images, batch_size=2, progress=False)
    assert feats.shape == (5, 32) and feats.dtype == np.float32
    one = ext.model(torch.from_numpy(read_rgb(images.files[3])).permute(2, 0, 1)[None])
    np.testing.assert_allclose(feats[3], one[0].numpy(), rtol=1e-5, atol=1e-6)


#################################################################################
#                                    Inception                                  #
#################################################################################


@pytest.fixture()
def no_default_inception(tmp_path, monkeypatch):
    """Hide any Inception file a developer machine may hold in ~/.cache or /tmp."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PIXCELL_INCEPTION", raising=False)
    monkeypatch.setattr("diffusion.metrics.inception.CLEANFID_DIR", tmp_path / "cleanfid_tmp")


def test_find_inception_offline_error_and_local_paths(tmp_path, monkeypatch, no_default_inception):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="--inception PATH or set PIXCELL_INCEPTION"):
        find_inception()
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_inception(tmp_path / "nope.pt")
    file = build_tiny_inception(tmp_path / "inc")
    assert find_inception(tmp_path / "inc") == file  # a folder holding the file
    monkeypatch.setenv("PIXCELL_INCEPTION", str(file))
    assert find_inception() == file
    renamed = tmp_path / "inception.pt"
    renamed.write_bytes(file.read_bytes())
    with pytest.raises(ValueError, match=f"by the name {INCEPTION_FILE}"):
        find_inception(renamed)
    broken = tmp_path / "broken" / INCEPTION_FILE
    broken.parent.mkdir()
    broken.write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="cannot load"):
        load_inception(broken)


def test_inception_features_equal_clean_fid_pipeline(tmp_path):
    """Our Inception path (file list, decode, clean resize, InceptionV3W) gives clean-fid's features exactly."""
    from cleanfid.fid import get_folder_features

    folder = _write_images(tmp_path / "imgs", 5, size=64)
    ext = load_inception(build_tiny_inception(tmp_path / "inc"))
    ours = embed_images(ext, list_images(folder), batch_size=2, progress=False)
    theirs = get_folder_features(
        str(folder),
        ext.model,
        num_workers=0,
        batch_size=2,
        device=torch.device("cpu"),
        mode="clean",
        verbose=False,
    )
    assert ours.shape == (5, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
