"""FSDP2 in train_pixcell on CPU (gloo): loss equality with one process and with DDP, sharded checkpoints that
resume bit for bit at the same world size and reshard to another (2 -> 1, 1 -> 2), consolidated EMA weights.

The two-process runs are one torchrun launch of tests/helpers/fsdp_runs.py (start-up dominates on 2 cores).
Tolerances (fp32 on CPU): the FSDP and single-process losses of the same global batch and noise agree to 1e-6
relative with AdamW (measured 8e-8 over 20 steps) and 1e-5 with CAME (measured 6e-8 at lr 1e-4 and 5e-6 at lr
1e-3: its factored statistics are sums over the shards, in another order); FSDP and DDP log the same losses to the
printed 5 decimals and end with weights within 1e-6 (measured 2e-8; up to 5e-7 on the attention key biases on
other data: their gradient is ~0, and AdamW scales the rounding noise up). The bf16 policy against bf16 autocast:
2e-3 (measured 2e-4).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion.checkpoints import latest_checkpoint
from train_scripts.train_pixcell import cli

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[3]
TINY = str(REPO / "configs" / "tiny" / "pixcell_tiny_256.py")
DRIVER = str(REPO / "tests" / "helpers" / "fsdp_runs.py")
COMMON = ("max_steps=20", "save_every_steps=10", "log_every_steps=1", "lr_schedule.warmup_steps=2")


def train(work: Path, data: Path, *options: str) -> int:
    argv = [
        TINY,
        "--work-dir",
        str(work),
        "--data-root",
        str(data),
        "--report-to",
        "none",
        "--cfg-options",
        *COMMON,
        *options,
    ]
    return cli(argv)


def logged_losses(work: Path) -> dict[int, str]:
    """{step: loss as logged} from train.log (a resumed run appends: the last entry of a step wins)."""
    text = (work / "train.log").read_text()
    return {int(s): loss for s, loss in re.findall(r"step (\d+)/\d+ loss ([0-9.]+)", text)}


def flat_shards(checkpoint: Path, tmp: Path) -> dict[str, object]:
    """Every entry of a checkpoint's DCP shards (model, optimizer, EMA), consolidated by torch's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "shards", tmp)
    out: dict[str, object] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(torch.load(tmp, weights_only=False), "")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_features) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    # A one-process run of the same global batch (4), for the 1 -> 2 reshard.
    assert train(out / "one", real_features, "fsdp.enabled=True", "train_batch_size=4", "max_steps=10") == 0
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    # torchrun as a module of this interpreter: no console script (whose shebang names one venv path)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        DRIVER,
        str(real_features),
        str(out),
        str(out / "one"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_fsdp_loss_equals_one_process_on_the_same_global_batch(runs):
    results = json.loads((runs / "equality.json").read_text())
    for name, tolerance in (("adamw", 1e-6), ("came", 1e-5)):
        fsdp, single = torch.tensor(results[f"{name}_fsdp"]), torch.tensor(results[f"{name}_single"])
        assert len(fsdp) == 20
        torch.testing.assert_close(fsdp, single, rtol=tolerance, atol=0.0, msg=name)
        if name == "adamw":
            assert single[-5:].mean() < single[:5].mean()  # it trains
    # FSDP's bf16 policy (bf16 compute copies of the fp32 shards) against bf16 autocast on one process: another
    # rounding, so a looser tolerance (measured 2e-4); and not the fp32 numbers, so the policy was in effect.
    bf16, single = torch.tensor(results["bf16_fsdp"]), torch.tensor(results["bf16_single"])
    torch.testing.assert_close(bf16, single, rtol=2e-3, atol=0.0)
    assert (bf16 - torch.tensor(results["adamw_fsdp"])).abs().max() > 1e-6


def test_fsdp_run_equals_the_ddp_run(runs):
    ddp, fsdp = runs / "ddp", runs / "fsdp"
    assert json.loads((fsdp / "env.json").read_text())["world_size"] == 2  # two real processes
    assert "fsdp: FULL_SHARD over mesh (2,)" in (fsdp / "train.log").read_text()
    assert logged_losses(ddp) == logged_losses(fsdp) and len(logged_losses(fsdp)) == 20
    ckpt = latest_checkpoint(fsdp)
    assert ckpt.name == "checkpoint-0000020"
    assert sorted(p.name for p in (ckpt / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((ckpt / "meta.json").read_text())["sharded_checkpoint"] is True
    ours = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")
    theirs = load_file(latest_checkpoint(ddp) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0.0, atol=1e-6, msg=k)


def test_resume_at_the_same_world_size_is_bit_exact(runs, tmp_path):
    straight = flat_shards(latest_checkpoint(runs / "fsdp"), tmp_path / "a.pt")
    resumed = flat_shards(latest_checkpoint(runs / "resumed"), tmp_path / "b.pt")
    assert straight.keys() == resumed.keys()
    assert any(".exp_avg_sq" in k for k in straight) and any(k.startswith("train.ema.") for k in straight)
    different = [k for k, v in straight.items() if torch.is_tensor(v) and not torch.equal(v, resumed[k])]
    assert not different, different[:5]
    assert logged_losses(runs / "resumed") == {
        s: v for s, v in logged_losses(runs / "fsdp").items() if s > 10
    }


def test_two_process_checkpoint_loads_exactly_on_one_and_trains_on(runs, tmp_path, real_features):
    """2 -> 1: the shards of every process land in one unsharded model, optimizer and EMA, equal to the weights
    gathered at save time; the same command on one process (global batch kept: batch 4) continues to step 20."""
    from diffusion.config import build_model_from_config, load_config
    from diffusion.model.loading import load_transformer
    from diffusion.training.ema import EMA
    from diffusion.training.fsdp import ShardedTrainingState
    from diffusion.training.optim import build_optimizer

    ckpt = runs / "fsdp" / "checkpoints" / "checkpoint-0000010"
    cfg = load_config(TINY, {})
    torch.manual_seed(7)  # other weights than the run's: the load must overwrite each one
    model = build_model_from_config(cfg)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    ema = EMA(model, cfg.ema_rate)
    ShardedTrainingState(model, optimizer, ema).load(ckpt / "shards")
    saved = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert len(optimizer.state) == len(list(model.parameters()))
    with ema.swapped(model):
        published = load_transformer(ckpt / "transformer_ema").state_dict()  # the consolidated EMA export
        assert all(torch.equal(v, published[k]) for k, v in model.state_dict().items())

    work = tmp_path / "two_to_one"
    shutil.copytree(ckpt, work / "checkpoints" / ckpt.name)
    assert train(work, real_features, "fsdp.enabled=True", "train_batch_size=4") == 0
    assert "saved by 2 process(es), resharding it onto 1" in (work / "train.log").read_text()
    assert latest_checkpoint(work).name == "checkpoint-0000020"
    assert sorted(logged_losses(work)) == list(range(11, 21))


def test_one_process_checkpoint_loads_exactly_on_two_and_trains_on(runs):
    assert json.loads((runs / "equality.json").read_text())["one_to_two_load_exact"] is True
    work = runs / "one_to_two"
    assert "saved by 1 process(es), resharding it onto 2" in (work / "train.log").read_text()
    assert "train_batch_size changed from 4 to 2" in (work / "train.log").read_text()
    ckpt = latest_checkpoint(work)
    assert ckpt.name == "checkpoint-0000020" and len(list((ckpt / "shards").glob("*.distcp"))) == 2


def test_fsdp_refusals_are_one_line(runs, tmp_path, real_features, capsys):
    assert train(tmp_path / "fp16", real_features, "fsdp.enabled=True", "mixed_precision='fp16'") == 2
    assert "fsdp with mixed_precision 'fp16' is not supported" in capsys.readouterr().err
    assert train(tmp_path / "hsdp", real_features, "fsdp.enabled=True", "fsdp.strategy='ZERO'") == 2
    assert "fsdp.strategy 'ZERO'" in capsys.readouterr().err
    # A DDP checkpoint resumed with fsdp.enabled (and the other way round) is refused, not misread.
    ckpt = runs / "ddp" / "checkpoints" / "checkpoint-0000010"
    work = tmp_path / "ddp"
    shutil.copytree(ckpt, work / "checkpoints" / ckpt.name)
    assert train(work, real_features, "fsdp.enabled=True") == 2
    assert "saved without fsdp.enabled and this run is with it" in capsys.readouterr().err
