"""Unit tests of diffusion/training: EMA, optimizers and LR schedules, the resumable sampler and batch stream, stop
signals, fp32 attention, checkpoints (atomic, keep-last-K, exact round trip), stage initialisation and the per-step
loop bookkeeping."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from torch import nn

from diffusion.checkpoints import latest_checkpoint, list_checkpoints
from diffusion.model.loading import save_original_checkpoint
from diffusion.model.pixcell_transformer import build_pixcell, compile_blocks
from diffusion.training.checkpoint import CheckpointManager
from diffusion.training.ema import EMA
from diffusion.training.init import initialise_from
from diffusion.training.optim import build_lr_scheduler, build_optimizer, lr_factor
from diffusion.training.precision import set_fp32_attention, set_gradient_checkpointing
from diffusion.training.sampler import BatchStream, ResumableSampler
from diffusion.training.signals import StopRequest, parse_duration


def _tiny(preset: str = "PixCell-tiny-64", seed: int = 0):
    torch.manual_seed(seed)
    return build_pixcell(preset, caption_channels=96)


# ---------------------------------------------------------------- EMA


def test_ema_update_is_the_lerp_and_skips_frozen_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    ema = EMA(model, rate=0.9)
    assert "1.weight" not in ema.names and len(ema.shadow) == 3
    before = [t.clone() for t in ema.shadow]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    for b, s, p in zip(before, ema.shadow, params):
        torch.testing.assert_close(s, 0.9 * b + 0.1 * p.detach(), rtol=0, atol=1e-6)
        assert s.dtype == torch.float32


def test_ema_swapped_restores_training_weights_and_state_round_trips():
    model = nn.Linear(5, 5)
    ema = EMA(model, rate=0.5)
    with torch.no_grad():
        model.weight.mul_(3.0)
    ema.update(model)
    trained = model.weight.detach().clone()
    with ema.swapped(model):
        torch.testing.assert_close(model.weight, ema.shadow[0])
        assert not torch.equal(model.weight, trained)
    assert torch.equal(model.weight, trained)
    other = EMA(nn.Linear(5, 5), rate=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.rate == 0.5 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="parameter names"):
        EMA(nn.Linear(5, 5, bias=False)).load_state_dict(ema.state_dict())


# ---------------------------------------------------------------- optimizer and LR


def test_optimizers_from_config_and_bad_keys():
    model = nn.Linear(4, 4)
    came = build_optimizer(
        model.parameters(),
        dict(type="CAME", lr=2e-5, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), weight_decay=0.0),
    )
    assert type(came).__name__ == "CAME"
    adamw = build_optimizer(model.parameters(), dict(type="AdamW", lr=1e-3, betas=[0.9, 0.99]))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="optimizer.type"):
        build_optimizer(model.parameters(), dict(type="SGD", lr=1.0))
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(model.parameters(), dict(type="AdamW", lr=1.0, momentum=0.9))
    with pytest.raises(ValueError, match="3 values"):
        build_optimizer(model.parameters(), dict(type="CAME", lr=1.0, betas=(0.9, 0.99)))
    # CAME actually optimises: a quadratic goes down.
    w = nn.Parameter(torch.ones(8))
    opt = build_optimizer([w], dict(type="CAME", lr=1e-2))
    for _ in range(20):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert (w**2).sum() < 8


def test_lr_schedule_warmup_constant_cosine():
    assert lr_factor(0, "constant", 4, None, 0.0) == pytest.approx(0.25)
    assert lr_factor(3, "constant", 4, None, 0.0) == 1.0 and lr_factor(10**6, "constant", 4, None, 0.0) == 1.0
    assert lr_factor(4, "cosine", 4, 14, 0.0) == pytest.approx(1.0)
    assert lr_factor(9, "cosine", 4, 14, 0.0) == pytest.approx(0.5)
    assert lr_factor(14, "cosine", 4, 14, 0.1) == pytest.approx(0.1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_lr_scheduler(opt, dict(type="constant", warmup_steps=2), None)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="cosine needs"):
        build_lr_scheduler(opt, dict(type="cosine"), None)
    with pytest.raises(ValueError, match="lr_schedule.type"):
        build_lr_scheduler(opt, dict(type="step"), 10)


# ---------------------------------------------------------------- sampler


def test_sampler_shards_disjointly_and_resumes_exactly():
    full = [list(ResumableSampler(23, 3, 2, r, seed=5)) for r in range(2)]
    assert len(full[0]) == len(full[1]) == 9  # 23 // 6 = 3 global batches of 2 x 3
    assert not set(full[0]) & set(full[1])
    s = ResumableSampler(23, 3, 2, 1, seed=5)
    s.set_position(0, 2)
    assert list(s) == full[1][6:]
    s.set_position(1, 0)
    assert list(s) != full[1]  # a new epoch is a new order
    held = ResumableSampler(10, 2, 1, 0, seed=0, exclude=[8, 9])
    assert set(held) <= set(range(8))
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ResumableSampler(3, 2, 2, 0)


def test_batch_stream_crosses_epochs_and_resumes_from_its_position():
    from torch.utils.data import DataLoader

    def stream(state, set_epoch=None):
        sampler = ResumableSampler(7, 2, seed=3)  # 3 batches of 2 per epoch
        return BatchStream(
            DataLoader(list(range(7)), batch_size=2, sampler=sampler), sampler, state, set_epoch
        )

    state, epochs = {"epoch": 0, "batch_in_epoch": 0}, []
    straight = stream(state, epochs.append)
    batches = [next(straight).tolist() for _ in range(8)]
    assert state == {"epoch": 2, "batch_in_epoch": 2} and epochs == [0, 1, 2]
    resumed = stream({"epoch": 1, "batch_in_epoch": 1})  # the position a checkpoint after 4 batches holds
    assert [next(resumed).tolist() for _ in range(4)] == batches[4:]
    position = straight.position
    ninth = next(straight).tolist()
    straight.rewind(position)  # that batch was not trained on: it comes again
    assert state == {"epoch": 2, "batch_in_epoch": 2} and next(straight).tolist() == ninth


# ---------------------------------------------------------------- signals


def test_stop_request_on_signal_and_time_limit():
    stop = StopRequest()
    try:
        assert stop.should_stop() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop() == "received SIGUSR1"
    finally:
        stop.restore()
    assert StopRequest(time_limit=0.0, install=False).should_stop().startswith("wall-time limit")
    assert parse_duration("1-02:00:30") == 26 * 3600 + 30 and parse_duration("90m") == 5400
    assert parse_duration("04:00") == 240 and parse_duration(None) is None
    with pytest.raises(ValueError, match="time limit"):
        parse_duration("soon")


# ---------------------------------------------------------------- precision


def test_fp32_attention_matches_default_processor():
    model = _tiny().eval()
    x, y, t = torch.randn(2, 16, 8, 8), torch.randn(2, 1, 96), torch.tensor([10, 500])
    ref = model(x, y, t).sample
    assert set_fp32_attention(model) == 4  # 2 blocks x (self, cross)
    torch.testing.assert_close(model(x, y, t).sample, ref, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y, t).sample
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_blocks_train_like_eager_blocks_under_checkpointing(backend):
    """The `compile` key: every block compiled in place (same parameter names), same loss and gradients."""
    torch._dynamo.reset()
    eager, compiled = _tiny().train(), _tiny().train()
    names = [n for n, _ in compiled.named_parameters()]
    assert compile_blocks(compiled, False) == compile_blocks(compiled, dict(enabled=False, backend="x")) == 0
    assert compile_blocks(compiled, dict(backend=backend)) == compiled.config.num_layers == 2
    assert [n for n, _ in compiled.named_parameters()] == names
    x, y, t = torch.randn(2, 16, 8, 8), torch.randn(2, 1, 96), torch.tensor([10, 500])
    for model in (eager, compiled):
        set_gradient_checkpointing(model, True)
        model(x, y, t).sample.square().mean().backward()
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="compile: expected"):
        compile_blocks(_tiny(), "yes")


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_keep_last_and_incomplete_ignored(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    ema = EMA(model, rate=0.5)
    manager = CheckpointManager(tmp_path, acc, keep_last=2)
    for step in (1, 2, 3):
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        ema.update(model)
        manager.save(
            step,
            {"position": step * 10},
            {"gen": torch.tensor([step])},
            ema=ema,
            portable={"transformer": (_tiny(), _tiny().state_dict())},
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000003"]
    # A save killed half-way (no meta.json, temporary name) is never picked.
    (tmp_path / "checkpoints" / ".checkpoint-0000004.tmp").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-0000005").mkdir()
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint-0000003" and (latest / "transformer" / "config.json").is_file()
    weights, shadow = model.weight.detach().clone(), [t.clone() for t in ema.shadow]
    with torch.no_grad():
        model.weight.zero_()
        ema.shadow[0].zero_()
    state, rank = manager.load(latest, ema=ema)
    assert state["position"] == 30 and state["step"] == 3 and rank["gen"].item() == 3
    assert torch.equal(model.weight, weights) and torch.equal(ema.shadow[0], shadow[0])


# ---------------------------------------------------------------- stage initialisation


def test_initialise_next_stage_from_original_and_diffusers_formats(tmp_path):
    src = _tiny("PixCell-tiny-64", seed=1)  # T = 1, 64 px
    save_original_checkpoint(src, tmp_path / "stage1.pth", as_ema=True)
    src.save_pretrained(tmp_path / "stage1_diffusers")
    for source in (tmp_path / "stage1.pth", tmp_path / "stage1_diffusers"):
        dst = _tiny("PixCell-tiny-128-T16", seed=2)  # T = 16, 128 px
        null_before = dst.caption_projection.uncond_embedding.clone()
        report = initialise_from(dst, source)
        keys = {k for k, _ in report.reinitialised}
        assert keys == {
            "caption_projection.uncond_embedding",
            "y_pos_embed.y_pos_embed",
            "pos_embed.pos_embed",
        }
        assert torch.equal(dst.caption_projection.uncond_embedding, null_before)
        torch.testing.assert_close(dst.proj_out.weight, src.proj_out.weight)
        torch.testing.assert_close(
            dst.transformer_blocks[1].attn2.to_k.weight, src.transformer_blocks[1].attn2.to_k.weight
        )
        assert "re-initialised caption_projection.uncond_embedding" in report.summary()
    wider = build_pixcell("PixCell-tiny-64", caption_channels=96, num_layers=3)
    with pytest.raises(ValueError, match="num_layers"):
        initialise_from(wider, tmp_path / "stage1.pth")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        initialise_from(_tiny(), tmp_path)
    assert math.isfinite(
        float(
            dst(torch.randn(1, 16, 16, 16), torch.randn(1, 16, 96), torch.tensor([3])).sample.detach().sum()
        )
    )


def test_clipped_step_skips_non_finite_gradients_and_the_guard_stops(tmp_path):
    import pytest
    from accelerate import Accelerator

    from diffusion.training.step import NonFiniteGuard, clipped_step

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 3)).sum().mul(float("nan")).backward()
    norm, skipped = clipped_step(accelerator, model.parameters(), optimizer, clip=1.0)
    assert skipped and norm != norm  # NaN norm: no update, gradients cleared
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    model(torch.ones(2, 3)).sum().mul(100).backward()
    norm, skipped = clipped_step(accelerator, model.parameters(), optimizer, clip=1.0)
    assert not skipped and norm > 1.0
    step = torch.cat([(a - b).flatten() for a, b in zip(model.parameters(), before)])
    assert torch.allclose(step.norm(), torch.tensor(0.1), atol=1e-5)  # lr x clipped unit-norm gradient

    guard = NonFiniteGuard(limit=2, work_dir=tmp_path)
    state = {"step": 1, "nonfinite_total": 0}
    guard.update(True, state)
    state["step"] = 2
    guard.update(False, state)  # a good step resets the run, not the total
    state["step"] = 3
    guard.update(True, state)
    assert state["nonfinite_total"] == 2
    state["step"] = 4
    with pytest.raises(
        RuntimeError, match=r"2 consecutive steps .*\(up to step 4\).* last good checkpoint is none"
    ):
        guard.update(True, state)
    assert state["nonfinite_total"] == 3


# ---------------------------------------------------------------- the run around the model


def test_training_state_round_trip_restores_counters_scheduler_and_generators(tmp_path):
    from accelerate import Accelerator

    from diffusion.training.checkpoint import restore_training_state, save_training_state
    from diffusion.training.run import resume_checkpoint, seeded_generator

    acc = Accelerator(cpu=True)
    net = nn.Linear(2, 2)
    model, opt = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=1.0))
    sched = build_lr_scheduler(opt, dict(type="cosine", warmup_steps=2), 10)
    manager = CheckpointManager(tmp_path, acc)
    gen = seeded_generator(acc.device, seed=4, rank=0)
    for _ in range(3):
        opt.step()
        sched.step()
    torch.rand(5, generator=gen)
    assert resume_checkpoint(tmp_path, None) is None  # a fresh run
    state = {"step": 3, "epoch": 1, "batch_in_epoch": 2}
    path = save_training_state(manager, 3, state, sched, "cfg = 1", {"noise": gen})
    assert (
        resume_checkpoint(tmp_path, None) == path == resume_checkpoint(tmp_path / "elsewhere", str(tmp_path))
    )
    expected = torch.rand(5, generator=gen)

    gen2 = seeded_generator(acc.device, seed=4, rank=0)
    sched2 = build_lr_scheduler(opt, dict(type="cosine", warmup_steps=2), 10)
    state2 = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    restore_training_state(manager, path, state2, sched2, {"noise": gen2})
    assert state2 == state and sched2.state_dict()["last_epoch"] == 3
    assert torch.equal(torch.rand(5, generator=gen2), expected)
    saved = torch.load(path / "trainer_state.pt", weights_only=False)
    assert saved["config"] == "cfg = 1" and set(saved) == {*state, "lr_scheduler", "config"}
    with pytest.raises(FileNotFoundError, match="--resume-from .*not a complete checkpoint"):
        resume_checkpoint(tmp_path, str(tmp_path / "nothing"))


def test_train_loop_logs_saves_and_stops_on_schedule(tmp_path, caplog):
    from accelerate import Accelerator

    from diffusion.training.run import RunSettings, TrainLoop

    settings = RunSettings(
        seed=0,
        optimizer={},
        lr_schedule={},
        ema_rate=None,
        keep_last=None,
        train_batch_size=1,
        report_to="none",
        log_every_steps=2,
        save_every_steps=3,
        max_nonfinite_steps=None,
        config_text="",
        config={},
    )
    saved = []
    with caplog.at_level("INFO", logger="pixcell.train"):
        with TrainLoop(Accelerator(cpu=True), tmp_path, settings, saved.append, total_steps=5, start_step=0,
                       resumed=False) as loop:  # fmt: skip
            for step in range(1, 5):
                loop.log_step(step, torch.tensor(0.5), 1e-3, 2.0, images=8, show_rate=step < 3)
                loop.save_if_due(step)
            loop.save_and_stop("received SIGTERM", 4)
            loop.save_and_stop("received SIGTERM", 4)  # saved already: not twice
            assert loop.bar.n == 4
    assert saved == [3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" img/s")[0] for line in lines if line.startswith("step ")] == [
        "step 2/5 loss 0.50000 lr 0.001 grad_norm 2",
        "step 4/5 loss 0.50000 lr 0.001 grad_norm 2",
    ]
    assert " img/s " in lines[0] and " img/s " not in lines[1]
    assert "received SIGTERM: saving a checkpoint at step 4 and stopping" in lines
