"""Forward and training-step throughput of the PixCell transformer, with FLOPs and MFU.

    python -m benchmarks.bench_model --preset PixCell-tiny-256 --batch 8 --dtype fp32            # CPU
    python -m benchmarks.bench_model --preset PixCell-XL/2-256 --batch 64 --dtype bf16 --device cuda --grad-ckpt
    python -m benchmarks.bench_model --preset PixCell-XL/2-1024 --batch 4 --dtype bf16 --device cuda --grad-ckpt

Random weights (the speed does not depend on them). FLOPs are counted by torch's FlopCounterMode on one forward
(and forward + backward for training); MFU = achieved FLOP/s / the device's bf16 peak, measured here with a
large bf16 matmul (--peak-tflops overrides). Training step = forward + backward + AdamW step, under autocast
for bf16/fp16 with fp32 master weights, like the trainer.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion.geometry import DTYPES, VAE_FACTOR
from diffusion.model.pixcell_transformer import PIXCELL_MODELS, build_pixcell


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Dense bf16 matmul throughput: the practical peak MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / iters


def bench(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = build_pixcell(args.preset).to(device)
    c = model.config
    size, tokens = c.sample_size, c.caption_num_tokens
    x = torch.randn(args.batch, c.in_channels, size, size, device=device)
    y = torch.randn(args.batch, tokens, c.caption_channels, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward():
        with torch.no_grad(), autocast:
            return model(x, y, t).sample

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with autocast:
            loss = model(x, y, t).sample.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Model FLOPs per image, counted on a batch of one (they scale linearly with the batch) and without
    # checkpointing's recomputation (MFU counts model FLOPs only).
    with FlopCounterMode(display=False) as fc, torch.no_grad(), autocast:
        model(x[:1], y[:1], t[:1])
    fwd_flops = fc.get_total_flops() * args.batch
    with FlopCounterMode(display=False) as fc:
        with autocast:
            model(x[:1], y[:1], t[:1]).sample.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    train_flops = fc.get_total_flops() * args.batch

    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    if args.compile:
        model = torch.compile(model)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_fwd = timed(forward, device, args.warmup, args.iters)
    t_train = timed(train_step, device, args.warmup, args.iters)
    row = {
        "preset": args.preset,
        "px": size * VAE_FACTOR,
        "batch": args.batch,
        "dtype": args.dtype,
        "ckpt": args.grad_ckpt,
        "compile": args.compile,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "fwd_s": t_fwd,
        "fwd_img_s": args.batch / t_fwd,
        "train_s": t_train,
        "train_img_s": args.batch / t_train,
        "gflop_img_fwd": fwd_flops / args.batch / 1e9,
        "gflop_img_train": train_flops / args.batch / 1e9,
        "peak_mem_gb": peak_memory_gb(device),
    }
    if device.type == "cuda":
        peak = args.peak_tflops or measured_peak_tflops(device)
        row["peak_tflops"] = peak
        row["mfu_fwd"] = fwd_flops / t_fwd / 1e12 / peak
        row["mfu_train"] = train_flops / t_train / 1e12 / peak
    return row


def numerics(preset: str, device: torch.device, batch: int = 4) -> list[dict]:
    """Relative error of bf16/fp16 autocast forward passes against fp32 (random weights, non-zero heads)."""
    torch.manual_seed(0)
    model = build_pixcell(preset).to(device).eval()
    for p in model.parameters():  # the zero-initialised heads would make every output 0
        p.data.normal_(0, 0.02)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, device=device)
    y = torch.randn(batch, c.caption_num_tokens, c.caption_channels, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad():
        ref = model(x, y, t).sample
        rows = []
        for name in ("bf16", "fp16"):
            with torch.autocast(device.type, dtype=DTYPES[name]):
                out = model(x, y, t).sample.float()
            rows.append(
                {
                    "preset": preset,
                    "dtype": name,
                    "rel_err_vs_fp32": ((out - ref).norm() / ref.norm()).item(),
                    "finite": bool(torch.isfinite(out).all()),
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = {float: lambda v: f"{v:.4g}", bool: lambda v: "yes" if v else "no"}
    cells = [[fmt.get(type(r.get(k)), str)(r.get(k, "")) for k in cols] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(cols)]
    print("| " + " | ".join(k.ljust(w) for k, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["PixCell-tiny-256"], choices=sorted(PIXCELL_MODELS))
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="one per preset, or one for all")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the training step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device bf16 peak for MFU (default: measured)"
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (first iterations compile)"
    )
    p.add_argument("--numerics", action="store_true", help="also print bf16/fp16 error against fp32")
    args = p.parse_args(argv)
    batches = args.batch * len(args.preset) if len(args.batch) == 1 else args.batch
    rows = []
    for preset, batch in zip(args.preset, batches):
        rows.append(bench(argparse.Namespace(**{**vars(args), "preset": preset, "batch": batch})))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print_table(rows)
    if args.numerics:
        print()
        print_table([r for preset in args.preset for r in numerics(preset, torch.device(args.device))])


if __name__ == "__main__":
    main()
