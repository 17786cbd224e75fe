"""Every config file loads strictly and builds its model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion.config import SCHEMA_FILE, build_model_from_config, load_config
from tests.helpers.paths import REPO

# PixCell trainer configs, and the ControlNet's against its own schema (every key that trainer reads);
# virtual-staining configs have their own schemas too and are checked in tests/virtual_staining/test_vs_train.py,
# the UNI prior's (configs/prior/, configs/demo/prior_*.py) in tests/diffusion/prior/test_prior.py.
CONFIGS = sorted(
    p
    for p in (REPO / "configs").rglob("*.py")
    if "_base_" not in p.parts
    and "virtual_staining" not in p.parts
    and "lora" not in p.parts
    and "prior" not in p.parts
    and not p.stem.startswith("prior")
)
SCHEMAS = {name: REPO / "configs" / "_base_" / f"{name}.py" for name in ("controlnet", "distill")}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_loads_and_builds(path):
    cfg = load_config(path, schema_file=SCHEMAS.get(path.parent.name, SCHEMA_FILE))
    with torch.device("meta"):
        model = build_model_from_config(cfg)
    assert model.config.caption_num_tokens == (cfg.resolution // 256) ** 2
    assert (
        "data" not in cfg or cfg.data.root is None or "PIXCELL_DATA_ROOT" in __import__("os").environ
    )  # no baked-in data paths


def test_published_stage_hyperparameters():
    stages = {r: load_config(Path("configs/pan_cancer") / f"pixcell_{r}.py") for r in (256, 512, 1024)}
    for cfg in stages.values():
        assert cfg.optimizer.type == "CAME" and cfg.optimizer.lr == 2e-5 and cfg.optimizer.weight_decay == 0
        assert tuple(cfg.optimizer.betas) == (0.9, 0.999, 0.9999)
        assert cfg.gradient_clip == 0.01 and cfg.ema_rate == 0.9999 and cfg.class_dropout_prob == 0.1
        assert cfg.lr_schedule.warmup_steps == 1000 and cfg.gradient_checkpointing
    assert [stages[r].train_batch_size for r in (256, 512, 1024)] == [128, 64, 12]
    with torch.device("meta"):
        interp = [build_model_from_config(stages[r]).config.interpolation_scale for r in (256, 512, 1024)]
    assert interp == [0.5, 1.0, 2.0]


def test_unknown_keys_and_mismatches_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'lerning_rate'"):
        load_config("configs/tiny/pixcell_tiny_256.py", {"lerning_rate": 1})
    with pytest.raises(ValueError, match="unknown config key data.'rot'"):
        load_config("configs/tiny/pixcell_tiny_256.py", {"data.rot": "/x"})
    cfg = load_config("configs/tiny/pixcell_tiny_256.py", {"resolution": 512})
    with pytest.raises(ValueError, match="needs 512 px and 4 token"):
        build_model_from_config(cfg)
    with pytest.raises(ValueError, match="not a multiple of 256"):
        load_config("configs/tiny/pixcell_tiny_256.py", {"resolution": 300})
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(tmp_path / "nope.py")
    # A dict where the schema has a value (or the reverse): one ValueError naming the key, not mmengine's TypeError.
    bad = tmp_path / "bad.py"
    bad.write_text("_base_ = ['%s']\nvae_scale = dict(x=1)\n" % (REPO / "configs/tiny/pixcell_tiny_256.py"))
    with pytest.raises(ValueError, match=r"bad.py: vae_scale=.* cannot inherit"):
        load_config(bad)
    # The compile switch: a dict of torch.compile arguments, set key by key.
    cfg = load_config(
        "configs/tiny/pixcell_tiny_256.py", {"compile.enabled": True, "compile.mode": "max-autotune"}
    )
    assert cfg.compile.enabled and cfg.compile.mode == "max-autotune" and cfg.compile.backend == "inductor"
