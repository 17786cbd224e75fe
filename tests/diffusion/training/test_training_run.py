"""The trainer skeleton of diffusion/training/run.py: the minimal trainer of its docstring, run for real (a linear
model on random data, on the CPU): it trains, checkpoints, stops on a signal at a step boundary through the one
stop protocol, and a resumed run ends bit-for-bit where an uninterrupted one does."""

from __future__ import annotations

import argparse
import os
import signal

import pytest
import torch
from mmengine.config import Config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diffusion.checkpoints import latest_checkpoint, list_checkpoints
from diffusion.training.run import RunSettings, launch, run_trainer, start_run
from diffusion.training.sampler import BatchStream, ResumableSampler

TOTAL = 6


def _config() -> Config:
    return Config(
        dict(
            seed=0,
            mixed_precision="no",
            optimizer=dict(type="AdamW", lr=1e-2, weight_decay=0.0),
            lr_schedule=dict(type="cosine", warmup_steps=1),
            ema_rate=0.9,
            keep_last=2,
            report_to="none",
            log_every_steps=2,
            save_every_steps=4,
            train_batch_size=4,
            gradient_clip=1.0,
        )
    )


def _train(work_dir, interrupt_after: int | None = None) -> dict:
    """The docstring's minimal trainer; sends itself SIGUSR1 after step `interrupt_after`. -> what it ended with."""
    out: dict = {}

    def main(args: argparse.Namespace) -> int:
        cfg = _config()
        accelerator, resume = launch(args.work_dir, args.resume_from, cfg.mixed_precision)
        torch.manual_seed(cfg.seed)  # identical initialisation on every process
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(20, 8, generator=g), torch.randn(20, 1, generator=g))
        sampler = ResumableSampler(
            len(data),
            cfg.train_batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            seed=cfg.seed,
        )
        run = start_run(
            accelerator, RunSettings.from_config(cfg), args.work_dir, nn.Linear(8, 1), TOTAL, resume
        )
        loader = DataLoader(data, cfg.train_batch_size, sampler=sampler, drop_last=True)
        batches = BatchStream(loader, sampler, run.state)
        with run.loop(run.save, None) as loop:
            while run.state["step"] < run.total_steps and not loop.should_stop(run.state["step"]):
                x, y = next(batches)
                noise = torch.randn(x.shape, generator=run.generator)  # the checkpointed noise generator
                loss = ((run.model(x + 0.1 * noise) - y) ** 2).mean()
                accelerator.backward(loss)
                grad_norm, step = run.optimizer_step(cfg.gradient_clip)
                loop.log_step(step, loss, run.lr, grad_norm)
                loop.save_if_due(step)
                if step == interrupt_after:
                    os.kill(
                        os.getpid(), signal.SIGUSR1
                    )  # as SLURM would: the next step boundary saves, stops
        out.update(
            step=run.state["step"],
            weights={k: v.clone() for k, v in run.unwrapped.state_dict().items()},
            ema=[t.clone() for t in run.ema.shadow],
            lr=run.lr,
        )
        return run.finish()

    assert run_trainer(main, argparse.Namespace(work_dir=work_dir, resume_from=None)) == 0
    return out


def test_minimal_trainer_stops_on_a_signal_and_resumes_bit_for_bit(tmp_path):
    straight = _train(tmp_path / "straight")
    assert straight["step"] == TOTAL
    assert [p.name for p in list_checkpoints(tmp_path / "straight")] == [
        "checkpoint-0000004",
        "checkpoint-0000006",
    ]

    stopped = _train(tmp_path / "split", interrupt_after=2)
    assert stopped["step"] == 2  # left the loop at the next step boundary, without training step 3
    assert latest_checkpoint(tmp_path / "split").name == "checkpoint-0000002"
    assert not torch.equal(stopped["weights"]["weight"], straight["weights"]["weight"])

    resumed = _train(tmp_path / "split")  # the same command again
    assert resumed["step"] == TOTAL
    assert "resumed from" in (tmp_path / "split" / "train.log").read_text()
    for key, value in straight["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key
    for a, b in zip(resumed["ema"], straight["ema"]):
        assert torch.equal(a, b)
    assert resumed["lr"] == straight["lr"]


def test_a_ddp_only_trainer_refuses_a_sharded_launch_with_its_own_line(tmp_path, monkeypatch):
    import types

    import accelerate
    from accelerate.utils import DistributedType

    from diffusion.training.run import is_sharded

    assert is_sharded(types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    assert not is_sharded(types.SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    fsdp = types.SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=True)
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: fsdp)
    with pytest.raises(ValueError, match=r"^train_x: DDP only \(why\)$"):
        launch(tmp_path / "work", None, ddp_only="train_x: DDP only (why)")
    assert not (tmp_path / "work").exists()  # refused before the work dir was locked or written


def test_next_batches_skips_a_step_whose_micro_batch_failed_and_counts_its_samples(caplog):
    import types

    from diffusion.training.run import Run

    state = {"step": 7, "skipped_samples": 0}
    run = types.SimpleNamespace(accelerator=types.SimpleNamespace(num_processes=1), state=state,
                                settings=types.SimpleNamespace(train_batch_size=4))  # fmt: skip
    stream = iter([{"x": 1}, {"x": 2}, {"x": 3}, None, {"x": 5}, {"x": 6}])
    assert Run.next_batches(run, stream, 2) == [{"x": 1}, {"x": 2}]
    with caplog.at_level("WARNING", logger="pixcell.train"):
        # one micro-batch had nothing loadable: the whole step is skipped
        assert Run.next_batches(run, stream, 2) is None
    assert state["skipped_samples"] == 4 and "step 7: a batch had no loadable sample" in caplog.text
    # the stream goes on after the skipped step
    assert Run.next_batches(run, stream, 2) == [{"x": 5}, {"x": 6}]
