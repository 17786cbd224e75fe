"""Training throughput of one PixCell training step: images/s, step time, peak memory, MFU (CUDA).

    python -m benchmarks.bench_train --preset PixCell-tiny-256 --batch 4 --device cpu
    python -m benchmarks.bench_train --preset PixCell-XL/2-256 --batch 64 --dtype bf16 --grad-ckpt
    python -m benchmarks.bench_train --preset PixCell-XL/2-1024 --batch 4 --dtype bf16 --grad-ckpt --peak-tflops 989
    python -m benchmarks.bench_train --preset PixCell-XL/2-256 --batch 128 --dtype bf16 --compile

A step is what train_pixcell.py does per optimizer step: noise + q_sample, forward under autocast, the hybrid loss,
backward, grad clipping, the optimizer (CAME by default, the multi-tensor one train_pixcell.py builds;
`--optimizer came-pytorch` for the package's per-tensor loop) and the fp32 EMA update, on random latents and UNI
tokens (data loading excluded). `--compile` compiles each transformer block as the `compile` config key does.
MFU = model FLOPs (3 x the analytic forward FLOPs, no credit for gradient-checkpoint recomputation) / step time /
peak; the peak is --peak-tflops or a measured bf16 matmul on the device.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.geometry import VAE_FACTOR
from diffusion.model.pixcell_transformer import (
    PIXCELL_MODELS,
    PixCellTransformer2DModel,
    build_pixcell,
    compile_blocks,
)
from diffusion.training.ema import EMA
from diffusion.training.optim import build_optimizer
from diffusion.training.precision import autocast_dtype, set_fp32_attention, set_gradient_checkpointing

DTYPE_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
OPTIMIZERS = {  # --optimizer -> the config's `optimizer` dict (lr is irrelevant to speed)
    "CAME": dict(type="CAME", lr=1e-5),
    "came-pytorch": dict(type="CAME", lr=1e-5, foreach=False),
    "AdamW": dict(type="AdamW", lr=1e-5),
    "AdamW-fused": dict(type="AdamW", lr=1e-5, fused=True),
}


def forward_flops(model: PixCellTransformer2DModel, batch: int) -> float:
    """Multiply-add FLOPs (x2) of one forward pass over `batch` images: blocks, patch embed, head."""
    c = model.config
    d, n, t = model.inner_dim, (c.sample_size // c.patch_size) ** 2, c.caption_num_tokens
    ctx = c.caption_channels
    per_block = (
        8 * n * d * d  # self-attention q, k, v, out projections
        + 4 * n * n * d  # self-attention scores and weighted sum
        # cross-attention: q and out projections, k and v projections, scores and weighted sum
        + 4 * n * d * d
        + 4 * t * d * d
        + 4 * n * t * d
        + 16 * n * d * d  # MLP d -> 4d -> d
    )
    rest = 2 * n * d * c.in_channels * c.patch_size**2 + 2 * n * d * c.patch_size**2 * model.out_channels
    rest += 2 * t * (ctx * d + d * d)  # UNI projection
    return batch * (c.num_layers * per_block + rest)


def measured_peak_tflops(
    device: torch.device, dtype: torch.dtype, size: int = 8192, iters: int = 20
) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * iters / (time.perf_counter() - t0) / 1e12


def bench(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    overrides = {"caption_channels": args.caption_channels} if args.caption_channels else {}
    if args.resolution:
        overrides["sample_size"] = args.resolution // VAE_FACTOR
    torch.manual_seed(0)
    model = build_pixcell(args.preset, **overrides).to(device).train()
    mixed = DTYPE_NAMES[args.dtype]
    if args.fp32_attention and mixed != "no":
        set_fp32_attention(model)
    set_gradient_checkpointing(model, args.grad_ckpt)
    compile_blocks(model, args.compile)
    opt = build_optimizer(model.parameters(), OPTIMIZERS[args.optimizer])
    ema = EMA(model, 0.9999)
    diffusion = GaussianDiffusion()
    scaler = torch.amp.GradScaler(device.type, enabled=mixed == "fp16")
    c = model.config
    x0 = torch.randn(args.batch, c.in_channels, c.sample_size, c.sample_size, device=device)
    uni = torch.randn(args.batch, c.caption_num_tokens, c.caption_channels, device=device)
    cuda = device.type == "cuda"

    def step() -> None:
        t = diffusion.sample_timesteps(args.batch, device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise)
        with torch.autocast(device.type, dtype=autocast_dtype(mixed), enabled=mixed != "no"):
            out = model(x_t, uni, t, return_dict=False)[0]
        loss = diffusion.training_losses(out.float(), x0, x_t, t, noise).loss.mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / args.steps
    if cuda:
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)
    flops = 3 * forward_flops(model, args.batch)
    row = dict(
        preset=args.preset,
        px=c.sample_size * VAE_FACTOR,
        batch=args.batch,
        dtype=args.dtype,
        grad_ckpt=args.grad_ckpt,
        optimizer=args.optimizer,
        compile=args.compile,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        step_s=dt,
        images_s=args.batch / dt,
        peak_gib=peak_mem,
        tflops=flops / dt / 1e12,
        mfu=None,
    )
    if cuda:
        peak = args.peak_tflops or measured_peak_tflops(device, torch.bfloat16)
        row["mfu"] = row["tflops"] / peak
        row["peak_tflops"] = peak
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="PixCell-tiny-256", choices=sorted(PIXCELL_MODELS))
    p.add_argument("--resolution", type=int, default=None, help="px (default: the preset's)")
    p.add_argument("--caption-channels", type=int, default=None, help="UNI dim (default: the preset's, 1536)")
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32", help="autocast dtype")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--fp32-attention", action="store_true", help="attention in fp32 under autocast")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="CAME")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile each transformer block (warm-up compiles)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (default: measured)")
    args = p.parse_args(argv)
    row = bench(args)
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a (CPU)"
    mem = "peak GiB (CUDA alloc)" if args.device.startswith("cuda") else "peak GiB (process RSS)"
    print(
        f"| preset | px | batch | dtype | grad ckpt | optimizer | compile | params (M) | step (s) | images/s | {mem} "
        "| TFLOP/s | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {row['preset']} | {row['px']} | {row['batch']} | {row['dtype']} | {row['grad_ckpt']} | "
        f"{row['optimizer']} | {row['compile']} | "
        f"{row['params_m']:.1f} | {row['step_s']:.3f} | {row['images_s']:.2f} | {row['peak_gib']:.2f} | "
        f"{row['tflops']:.3f} | {mfu} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
