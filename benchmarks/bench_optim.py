"""Optimizer step cost on a PixCell preset's parameters: ms per step and aten ops per step (each op is one or more
kernel launches on a GPU, so on a GPU a step with tens of thousands of them is bound by launch overhead).

    python -m benchmarks.bench_optim                                        # CPU, PixCell-tiny-256
    python -m benchmarks.bench_optim --preset PixCell-XL/2-256 --device cuda

Rows: CAME as train_pixcell.py builds it (multi-tensor, diffusion/training/came.py), came-pytorch's per-tensor
loop (`optimizer.foreach=False`), and torch AdamW (foreach; fused on CUDA). Gradients are random, fp32, fixed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion.model.pixcell_transformer import PIXCELL_MODELS, build_pixcell
from diffusion.training.optim import build_optimizer


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
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
    row = dict(tensors=len(params), params_m=sum(p.numel() for p in params) / 1e6, ops=counter.count, ms=ms,
               peak_gib=peak)  # fmt: skip
    del opt, model, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="PixCell-tiny-256", choices=sorted(PIXCELL_MODELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps per optimizer")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    kinds = {
        "CAME (multi-tensor, default)": dict(type="CAME", lr=2e-5),
        "CAME (came-pytorch loop)": dict(type="CAME", lr=2e-5, foreach=False),
        f"AdamW ({'fused' if cuda else 'foreach'})": dict(type="AdamW", lr=2e-5, **({"fused": True} if cuda else {})),
    }  # fmt: skip
    where = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.preset}, {where}")
    print("| optimizer | tensors | params (M) | aten ops / step | ms / step | peak GiB |")
    print("|---|---|---|---|---|---|")
    for name, kind in kinds.items():
        r = bench(args.preset, device, kind, args.steps)
        peak = f"{r['peak_gib']:.2f}" if cuda else "n/a"
        print(
            f"| {name} | {r['tensors']} | {r['params_m']:.1f} | {r['ops']} | {r['ms']:.1f} | {peak} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
