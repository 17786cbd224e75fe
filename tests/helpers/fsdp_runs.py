"""The two-process side of tests/diffusion/training/test_fsdp.py, started once by torchrun (2 processes, gloo).

One launch runs every world-size-2 case in the same two processes (process start-up dominates on 2 cores):

    torchrun --nproc_per_node 2 tests/helpers/fsdp_runs.py DATA OUT ONE_PROCESS_RUN

1. `train_pixcell` under DDP and under FSDP (FULL_SHARD), 20 steps each, same config: OUT/ddp, OUT/fsdp;
2. the FSDP run resumed from its checkpoint 10 at the same world size: OUT/resumed (bit-exact expected);
3. a run saved by one process (ONE_PROCESS_RUN, checkpoint 10, batch 4) loaded on two: the gathered weights are
   compared with its portable ones, then it trains on to 20 with batch 2 (the same global batch): OUT/one_to_two;
4. the library's FSDP step against a single-process step on the same global batch (same noise), 20 steps with
   AdamW and with CAME in fp32, and with AdamW under the bf16 policy against bf16 autocast: the losses go to
   OUT/equality.json.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny" / "pixcell_tiny_256.py")
COMMON = ("max_steps=20", "save_every_steps=10", "log_every_steps=1", "lr_schedule.warmup_steps=2")


def train(work: Path, data: str, *options: str) -> None:
    from train_scripts.train_pixcell import cli

    argv = [
        TINY,
        "--work-dir",
        str(work),
        "--data-root",
        data,
        "--report-to",
        "none",
        "--cfg-options",
        *COMMON,
        *options,
    ]
    assert cli(argv) == 0, f"train_pixcell failed in {work}"


def one_to_two(source: Path, work: Path, data: str) -> bool:
    """Copy checkpoint 10 of a one-process run; check the two-process load against its portable weights; train on."""
    from safetensors.torch import load_file

    from diffusion.config import build_model_from_config, load_config
    from diffusion.training.fsdp import FSDPSettings, ShardedTrainingState, full_state_dict, shard_model
    from diffusion.training.optim import build_optimizer

    ckpt = source / "checkpoints" / "checkpoint-0000010"
    cfg = load_config(TINY, {"data.root": data})
    torch.manual_seed(123)  # other weights than the run's: the load must overwrite every one
    model = shard_model(
        build_model_from_config(cfg), FSDPSettings("FULL_SHARD", True, None), torch.device("cpu")
    )
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    ShardedTrainingState(model, optimizer).load(ckpt / "shards")
    full = full_state_dict(model)
    exact = True
    if dist.get_rank() == 0:
        saved = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")
        exact = saved.keys() == full.keys() and all(torch.equal(saved[k], full[k]) for k in saved)
    if dist.get_rank() == 0:
        (work / "checkpoints").mkdir(parents=True)
        shutil.copytree(ckpt, work / "checkpoints" / ckpt.name)
    dist.barrier()
    train(work, data, "fsdp.enabled=True", "train_batch_size=2")
    return exact


def equality(steps: int, optimizer_cfg: dict, bf16: bool = False) -> tuple[list[float], list[float]]:
    """Loss per step of the FSDP model (each process its half of the global batch) and of a single-process copy
    (the whole batch, the mean of the two halves' losses, each half with that process's noise generator).
    bf16: FSDP's mixed-precision policy (bf16 compute copies, fp32 reduction) against bf16 autocast."""
    from diffusion.config import build_model_from_config, load_config
    from diffusion.gaussian_diffusion import GaussianDiffusion
    from diffusion.training.fsdp import FSDPSettings, shard_model
    from diffusion.training.optim import build_optimizer
    from diffusion.training.run import seeded_generator
    from diffusion.training.step import noised_inputs

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(TINY, {})
    torch.manual_seed(cfg.seed)
    reference = build_model_from_config(cfg)
    settings = FSDPSettings("FULL_SHARD", True, torch.bfloat16 if bf16 else None)
    model = shard_model(copy.deepcopy(reference), settings, torch.device("cpu"))
    opt = build_optimizer(model.parameters(), optimizer_cfg)
    ref_opt = build_optimizer(reference.parameters(), optimizer_cfg)
    gens = [seeded_generator(torch.device("cpu"), cfg.seed, r) for r in range(world)]
    ref_gens = [seeded_generator(torch.device("cpu"), cfg.seed, r) for r in range(world)]
    diffusion = GaussianDiffusion()

    def half_loss(m, x0, uni, gen):
        x_t, t, noise, uni = noised_inputs(diffusion, x0, uni, gen, 0.1, reference.drop_condition)
        out = m(x_t, uni, t, return_dict=False)[0]
        return diffusion.training_losses(out.float(), x0, x_t, t, noise).loss.mean()

    ours, theirs = [], []
    for step in range(steps):
        data = torch.Generator().manual_seed(step)  # the global batch of this step, the same on every process
        x0 = torch.randn(2 * world, 16, 32, 32, generator=data)
        uni = torch.randn(2 * world, 1, 96, generator=data)
        halves = list(zip(x0.chunk(world), uni.chunk(world)))
        loss = half_loss(model, *halves[rank], gens[rank])
        loss.backward()  # FSDP: gradients reduce-scattered, averaged over the processes
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        ours.append(mean.item() / world)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ref_loss = sum(half_loss(reference, x, u, g) for (x, u), g in zip(halves, ref_gens)) / world
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
        theirs.append(ref_loss.item())
    return ours, theirs


def main(data: str, out: Path, one_process_run: Path) -> None:
    train(out / "ddp", data)
    train(out / "fsdp", data, "fsdp.enabled=True")
    if dist.get_rank() == 0:
        src = out / "fsdp" / "checkpoints" / "checkpoint-0000010"
        shutil.copytree(src, out / "resumed" / "checkpoints" / src.name)
    dist.barrier()
    train(out / "resumed", data, "fsdp.enabled=True")
    exact = one_to_two(one_process_run, out / "one_to_two", data)
    adamw = dict(type="AdamW", lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    came = dict(type="CAME", lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    results = {"one_to_two_load_exact": exact}
    for name, opt in (("adamw", adamw), ("came", came)):
        results[f"{name}_fsdp"], results[f"{name}_single"] = equality(20, opt)
    results["bf16_fsdp"], results["bf16_single"] = equality(20, adamw, bf16=True)
    if dist.get_rank() == 0:
        (out / "equality.json").write_text(json.dumps(results, indent=1))
    dist.barrier()


if __name__ == "__main__":
    from accelerate.state import PartialState

    # Every run ends with accelerate's end_training, which destroys the process group; the runs here share one.
    PartialState.destroy_process_group = lambda self, group=None: None
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
    dist.destroy_process_group()
