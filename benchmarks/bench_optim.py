"""Optimizer step cost on a PixCell preset's parameters: ms per step and aten ops per step (views excluded: each
remaining op is one or more kernel launches on a GPU, so a step with tens of thousands of them is bound by launch
overhead there).

    python -m benchmarks.bench_optim                                        # CPU, PixCell-tiny-256
    python -m benchmarks.bench_optim --preset PixCell-XL/2-256 --device cuda
    python -m benchmarks.bench_optim --preset PixCell-XL/2-256 --max-bucket-numel 67108864   # GPU buckets, on CPU

Rows: CAME as train_pixcell.py builds it (multi-tensor, diffusion/training/came.py), came-pytorch's per-tensor
loop (`optimizer.foreach=False`), and torch AdamW (foreach; fused on CUDA). Gradients are random, fp32, fixed.
For scale, the last row counts the ops of the model's forward + backward (batch 1, eager: the op count does not
depend on the batch) and of the fp32 EMA update, the rest of a training step.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion.model.pixcell_transformer import PIXCELL_MODELS, build_pixcell
from diffusion.training.ema import EMA
from diffusion.training.optim import build_optimizer

if TYPE_CHECKING:
    from torch._ops import OpOverload


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the `with` block, except views (detach, unbind, reshape...), which
    launch no kernel."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(
        self,
        func: OpOverload,
        types: tuple[type, ...],
        args: tuple[object, ...] = (),
        kwargs: dict[str, object] | None = None,
    ) -> object:
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def bench(preset: str, device: torch.device, kind: dict, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_pixcell(preset).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = build_optimizer(params, kind)
    opt.step()  # state allocation (and stacking) happens on the first step
    with OpCounter() as counter:
        opt.step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    ms = (time.perf_counter() - t0) / steps * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = dict(
        tensors=len(params),
        params_m=sum(p.numel() for p in params) / 1e6,
        ops=counter.count,
        ms=ms,
        peak_gib=peak,
    )
    del opt, model, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def step_ops(preset: str, device: torch.device) -> tuple[int, int]:
    """aten ops of one forward + backward (batch 1, fp32) and of one EMA update."""
    torch.manual_seed(0)
    model = build_pixcell(preset).to(device).train()
    c = model.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, device=device)
    uni = torch.randn(1, c.caption_num_tokens, c.caption_channels, device=device)
    t = torch.tensor([500], device=device)
    ema = EMA(model)
    with OpCounter() as model_ops:
        model(x, uni, t, return_dict=False)[0].square().mean().backward()
    with OpCounter() as ema_ops:
        ema.update(model)
    return model_ops.count, ema_ops.count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="PixCell-tiny-256", choices=sorted(PIXCELL_MODELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps per optimizer")
    p.add_argument("--max-bucket-numel", type=int, default=None, help="CAME bucket cap (default: per device)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    kinds = {
        "CAME (multi-tensor, default)": dict(type="CAME", lr=2e-5, max_bucket_numel=args.max_bucket_numel),
        "CAME (came-pytorch loop)": dict(type="CAME", lr=2e-5, foreach=False),
        f"AdamW ({'fused' if cuda else 'foreach'})": dict(
            type="AdamW", lr=2e-5, **({"fused": True} if cuda else {})
        ),
    }
    where = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.preset}, {where}")
    print("| optimizer | tensors | params (M) | aten ops / step | ms / step | peak GiB |")
    print("|---|---|---|---|---|---|")
    for name, kind in kinds.items():
        r = bench(args.preset, device, kind, args.steps)
        peak = f"{r['peak_gib']:.2f}" if cuda else "n/a"
        tensors, params_m = r["tensors"], r["params_m"]
        print(
            f"| {name} | {r['tensors']} | {r['params_m']:.1f} | {r['ops']} | {r['ms']:.1f} | {peak} |",
            flush=True,
        )
    fwd_bwd, ema = step_ops(args.preset, device)
    print(
        f"| (rest of a step) forward + backward / EMA update | {tensors} | {params_m:.1f} | {fwd_bwd} / {ema} | | |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
