"""UNI prior training and sampling speed at the full configs (configs/prior/prior_{256,1024}.py): time per epoch per
million patches, and prior samples per second.

    python -m benchmarks.bench_prior                          # CPU, fp32
    python -m benchmarks.bench_prior --device cuda --dtype bf16

One optimizer step = forward + backward of the rectified-flow loss + AdamW + EMA on a batch of random 1536-d tokens
(the compute of a step does not depend on the values). A million 1024 px patches give 16 million samples to the
PixCell-256 prior (one per 256 px tile) and one million 16-token samples to the PixCell-1024 prior. Reading the
features is not timed (it is the data loader's, in parallel workers). Prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffusion.config import load_strict_config
from diffusion.flow import flow_matching_loss
from diffusion.geometry import DTYPES
from diffusion.prior.model import DEFAULT_FLOW_STEPS, UNIPrior
from diffusion.training.ema import EMA
from diffusion.training.optim import build_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "prior"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(
    name: str, device: torch.device, dtype: torch.dtype, steps: int, batch: int | None, n_sample: int
) -> dict:
    cfg = load_strict_config(CONFIGS / f"{name}.py", CONFIGS / "_base_" / "prior.py")
    tokens = (cfg.resolution // 256) ** 2
    batch = batch or cfg.train_batch_size
    torch.manual_seed(0)
    prior = UNIPrior(tokens, 1536, labels=[f"label{i}" for i in range(32)], **cfg.prior).to(device)
    opt = build_optimizer(prior.parameters(), cfg.optimizer)
    ema = EMA(prior, cfg.ema_rate)
    x1 = torch.randn(batch, tokens, 1536, device=device)
    labels = torch.randint(0, 33, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = flow_matching_loss(prior, torch.randn_like(x1), x1, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(prior)

    step()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    per_step = (time.perf_counter() - t0) / steps
    samples_per_s = batch / per_step
    samples_per_mpatch = 1e6 * (1024 // cfg.resolution) ** 2  # samples per million 1024 px patches
    n = n_sample
    prior.eval()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        prior.sample(2, "label0", 2.0, 2)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        prior.sample(n, "label0", 2.0, DEFAULT_FLOW_STEPS)
        sync(device)
    sample_s = time.perf_counter() - t0
    return {
        "config": name,
        "tokens": tokens,
        "params (M)": sum(p.numel() for p in prior.parameters()) / 1e6,
        "batch": batch,
        "step ms": 1e3 * per_step,
        "train samples/s": samples_per_s,
        "epoch per 1M patches": samples_per_mpatch / samples_per_s,
        "prior samples/s (50 Euler steps, w=2)": n / sample_s,
    }


def fmt_duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"]
    )  # fp16 autocast would need a grad scaler
    p.add_argument("--configs", nargs="+", default=["prior_256", "prior_1024"])
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per config")
    p.add_argument("--batch", type=int, default=None, help="default: the config's train_batch_size")
    p.add_argument(
        "--sample-n", type=int, default=None, help="prior samples timed (default: 256 on GPU, 16 on CPU)"
    )
    args = p.parse_args()
    device = torch.device(args.device)
    n_sample = args.sample_n or (256 if device.type == "cuda" else 16)
    rows = [
        bench(name, device, DTYPES[args.dtype], args.steps, args.batch, n_sample) for name in args.configs
    ]
    keys = list(rows[0])
    print(f"device {device} ({torch.get_num_threads()} threads), {args.dtype}")
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            if k == "epoch per 1M patches":
                cells.append(fmt_duration(v))
            elif isinstance(v, float):
                cells.append(f"{v:.3g}" if v < 100 else f"{v:.0f}")
            else:
                cells.append(str(v))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
