"""The multi-tensor CAME (diffusion/training/came.py) against came-pytorch, the reference implementation."""

from __future__ import annotations

import pytest
import torch
from came_pytorch import CAME as ReferenceCAME
from torch import nn

from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.training.came import CAME
from diffusion.training.optim import build_optimizer

KW = dict(lr=1e-1, weight_decay=0.01, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip_threshold=1.0)


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Tiny PixCell: 2-D, 4-D (patch conv) and 1-D tensors, many of each shape (buckets of several)."""
    torch.manual_seed(0)
    return build_pixcell("PixCell-tiny-64").to(dtype).train()


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    for _ in range(n):
        dtype = next(model.parameters()).dtype
        x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g).to(dtype)
        uni = torch.randn(2, c.caption_num_tokens, c.caption_channels, generator=g).to(dtype)
        t = torch.randint(0, 1000, (2,), generator=g)
        loss = model(x, uni, t, return_dict=False)[0].float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _max_rel(a: nn.Module, b: nn.Module) -> float:
    return max(
        ((p - q).abs().max() / q.abs().max().clamp_min(1e-12)).item()
        for p, q in zip(a.parameters(), b.parameters())
    )


def test_same_updates_as_came_pytorch():
    ours, ref = _model(), _model()
    start = [p.detach().clone() for p in ours.parameters()]
    opt = CAME(ours.parameters(), max_bucket_numel=5000, **KW)  # small buckets: shapes split over several
    _steps(ours, opt, 5)
    _steps(ref, ReferenceCAME(ref.parameters(), **KW), 5)
    moved = max((p - s).abs().max().item() for p, s in zip(ours.parameters(), start))
    assert moved > 1e-3  # the steps did change the weights...
    assert _max_rel(ours, ref) < 1e-6  # ...the same way as came-pytorch (bitwise on this CPU)
    shapes = {tuple(p.shape) for p in ours.parameters()}
    assert any(len(s) == 4 for s in shapes) and any(len(s) == 1 for s in shapes)
    # A few hundred ops instead of ~30 per tensor: far fewer buckets than tensors.
    params = [p for p in ours.parameters() if p.grad is not None]
    default_buckets = len(CAME(params, lr=1.0)._buckets(params))
    assert len(opt._buckets(params)) > default_buckets  # the size cap splits buckets
    assert default_buckets < len(params) / 4


def test_bf16_parameters_step_as_in_came_pytorch():
    """bf16 weights and gradients: fp32 state and math, the update rounded into the weights once, as came-pytorch."""
    ours, ref = _model(torch.bfloat16), _model(torch.bfloat16)
    opt = CAME(ours.parameters(), **KW)
    _steps(ours, opt, 3)
    _steps(ref, ReferenceCAME(ref.parameters(), **KW), 3)
    assert _max_rel(ours, ref) < 1e-2  # bf16 resolution; equal on this CPU
    assert {v.dtype for s in opt.state.values() for v in s.values() if torch.is_tensor(v)} == {torch.float32}


def test_state_dict_is_came_pytorch_layout_both_ways():
    """Checkpoints from either implementation resume in the other: 3 steps + load + 3 steps == 6 steps."""
    straight = _model()
    _steps(straight, ReferenceCAME(straight.parameters(), **KW), 6)

    for first, second in ((ReferenceCAME, CAME), (CAME, ReferenceCAME)):
        a = _model()
        opt_a = first(a.parameters(), **KW)
        _steps(a, opt_a, 3)
        state = opt_a.state_dict()
        keys = {k for s in state["state"].values() for k in s if k != "RMS"}
        assert keys == {"step", "exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
                        "exp_avg_res_col"}  # fmt: skip
        b = _model()
        b.load_state_dict(a.state_dict())
        opt_b = second(b.parameters(), **KW)
        opt_b.load_state_dict(state)
        _steps(b, opt_b, 3, seed=2)
        c = _model()
        c.load_state_dict(a.state_dict())
        ref_b = ReferenceCAME(c.parameters(), **KW)
        ref_b.load_state_dict(state)
        _steps(c, ref_b, 3, seed=2)
        assert _max_rel(b, c) < 1e-5, (first.__module__, second.__module__)
        assert all(s["step"] == 6 for s in opt_b.state_dict()["state"].values())


def test_state_is_packed_views_and_survives_a_missing_gradient():
    w = nn.Parameter(torch.ones(3, 4))
    v = nn.Parameter(torch.ones(3, 4))
    opt = CAME([w, v], lr=1e-2)
    (w.sum() + 2 * v.sum()).backward()
    opt.step()
    ew, ev = opt.state[w]["exp_avg"], opt.state[v]["exp_avg"]
    assert ew.untyped_storage().data_ptr() == ev.untyped_storage().data_ptr()  # one stacked buffer
    # Only w has a gradient now: its bucket changes, its state carries over, v's stays as it was.
    v.grad = None
    before_v = opt.state[v]["exp_avg"].clone()
    opt.step()
    assert opt.state[w]["step"] == 2 and opt.state[v]["step"] == 1
    assert torch.equal(opt.state[v]["exp_avg"], before_v)
    assert not torch.equal(opt.state[w]["exp_avg"], ew.new_zeros(3, 4))


def test_built_from_config_and_bad_arguments():
    model = nn.Linear(4, 4)
    assert isinstance(build_optimizer(model.parameters(), dict(type="CAME", lr=1e-4)), CAME)
    ref = build_optimizer(model.parameters(), dict(type="CAME", lr=1e-4, foreach=False))
    assert isinstance(ref, ReferenceCAME)
    with pytest.raises(ValueError, match="lr must be > 0"):
        CAME(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        CAME(model.parameters(), lr=1e-3, betas=(0.9, 0.99))


def test_fsdp2_dtensor_parameters_step_like_plain_ones(tmp_path):
    """FSDP2 shards parameters as DTensors: CAME steps them (came_sharded.py) with the plain tensors' math, here on
    a one-process mesh (the 2-process case against one process: tests/diffusion/training/test_fsdp.py)."""
    import torch.distributed as dist

    from diffusion.training.came import DTensor

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        shapes = [(5, 3), (4, 2, 3), (6,)]
        plain = [nn.Parameter(torch.randn(s)) for s in shapes]
        sharded = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
        assert all(isinstance(w, DTensor) for w in sharded)
        opts = [CAME(ps, lr=1e-2, weight_decay=0.1) for ps in (plain, sharded)]
        for _ in range(3):
            grads = [torch.randn(s) for s in shapes]
            for p, w, g in zip(plain, sharded, grads):
                p.grad, w.grad = g.clone(), distribute_tensor(g.clone(), mesh, [Shard(0)])
            for opt in opts:
                opt.step()
        for p, w in zip(plain, sharded):
            torch.testing.assert_close(w.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()
