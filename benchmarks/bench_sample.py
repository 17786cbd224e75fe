"""Sampling speed: images/s at 256 and 1024 px, seconds per large region (batched windows vs the one-window
reference) and their ratio. Random weights (speed does not depend on them), random UNI conditions.

    # CPU, tiny models (always runnable): the 1024-style model is PixCell-tiny-128-T16 (128 px windows), so its
    # "region" has the 4096 px geometry scaled down: 4 x 4 windows, stride = half a window
    python -m benchmarks.bench_sample
    # GPU, published sizes (targets: >= 25 images/s at 256 px, a 4096 px region in <= 60 s, batched >= 2x)
    python -m benchmarks.bench_sample --preset PixCell-XL/2-256 PixCell-XL/2-1024 --device cuda --dtype bf16
    # the same with each transformer block compiled for the batched rows (the tools' --compile); the one-window
    # reference stays eager, as the published script ran
    python -m benchmarks.bench_sample --preset PixCell-XL/2-1024 --device cuda --dtype bf16 --compile
    # a distilled student's shape (guidance embedding, no unconditional pass), 4 LCM steps
    python -m benchmarks.bench_sample --preset PixCell-XL/2-256 PixCell-XL/2-1024 --device cuda --dtype bf16 --student

Steps 20 (DPM-Solver++), guidance on (one batched conditional + unconditional forward per step), VAE decode
included (windows at half a window's stride, as the 4K tool does); PNG writing is not (the tools write on
background threads).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from diffusion.geometry import DTYPES, SD35_LATENT_SCALE, SD35_LATENT_SHIFT
from diffusion.model.pixcell_transformer import build_pixcell, compile_blocks
from diffusion.sampling.large_image import (
    Chunker,
    decode_region,
    default_vae_batch,
    default_window_batch,
    denoise_region,
)
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.samplers import make_scheduler, sampler_name
from diffusion.standins import reference_eps_fn

TINY = ["PixCell-tiny-256", "PixCell-tiny-128-T16"]


def build_vae(kind: str, device: torch.device, dtype: torch.dtype):
    """An SD3.5-shaped AutoencoderKL (random weights) for the XL presets, the tiny stand-in otherwise."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if kind == "sd35":
        blocks, layers, groups = (128, 256, 512, 512), 2, 32
    else:
        blocks, layers, groups = (32, 32, 64, 64), 1, 16
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=blocks,
        layers_per_block=layers,
        latent_channels=16,
        norm_num_groups=groups,
        scaling_factor=SD35_LATENT_SCALE,
        shift_factor=SD35_LATENT_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return vae.to(device, dtype).eval()


def timed(
    fn: Callable[[], object], device: torch.device, repeats: int = 1, warmup: Callable | None = None
) -> float:
    """Seconds per call: the fastest of `repeats` calls (robust to a busy machine), after a warm-up call."""
    (warmup or fn)()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench_images(
    pipe: PixCellPipeline, batch: int, steps: int, guidance: float, device: torch.device, repeats: int
) -> float:
    t = pipe.transformer.config
    cond = torch.randn(batch, t.caption_num_tokens, t.caption_channels, device=device)
    latents = torch.randn(batch, t.in_channels, t.sample_size, t.sample_size, device=device)

    def run():
        pipe(
            cond,
            guidance_scale=guidance,
            num_inference_steps=steps,
            latents=latents,
            output_type="pt",
            progress=False,
        )

    return batch / timed(run, device, repeats)


def bench_region(
    pipe: PixCellPipeline,
    windows: int,
    stride: int,
    steps: int,
    guidance: float,
    device: torch.device,
    window_batch: int | None,  # windows per forward; None: the 4K tool's default for the device
    vae_batch: int | None,  # windows per VAE decode; None: the default
    reference: bool,
    repeats: int = 1,
) -> float:
    """Seconds for one region of `windows` x `windows` model windows: denoising plus the blended decode."""
    t = pipe.transformer.config
    m = math.isqrt(t.caption_num_tokens)
    grid = torch.randn(windows * m, windows * m, t.caption_channels)
    side = windows * t.sample_size
    latents = torch.randn(1, t.in_channels, side, side)
    if reference:  # one window per forward (cond and uncond apart), one per VAE call
        wb, vb = Chunker(1), Chunker(1)
    else:  # the 4K tool's defaults unless --window-batch / --vae-batch
        wb = Chunker(window_batch or default_window_batch(device))
        vb = Chunker(vae_batch or default_vae_batch(device))

    def run(steps: int = steps) -> None:
        x = denoise_region(
            pipe.transformer,
            grid,
            stride=stride,
            sampler=sampler_name(pipe.scheduler),
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents,
            window_batch=wb,
            window_eps=reference_eps_fn if reference else None,
            progress=False,
        )
        decode_region(pipe.vae, x, t.sample_size, t.sample_size // 2, vae_batch=vb)

    return timed(run, device, repeats, warmup=lambda: run(2))  # warm-up: the same shapes, 2 steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=TINY, help="PIXCELL_MODELS presets (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    p.add_argument(
        "--batch", type=int, default=None, help="images per batch (default: 64/T on GPU, 8/T on CPU)"
    )
    p.add_argument("--steps", type=int, default=None, help="default: 20 (DPM-Solver++), 4 with --student")
    p.add_argument(
        "--student", action="store_true", help="a distilled student (guidance embedding), sampled with LCM"
    )
    p.add_argument(
        "--stride", type=int, default=None, help="latent px between windows (default: half a window)"
    )
    p.add_argument(
        "--region-windows", type=int, default=4, help="region side in windows (4: 4096 px at 1024)"
    )
    p.add_argument(
        "--window-batch", type=int, default=None, help="windows per forward (default: all on GPU, 8 on CPU)"
    )
    p.add_argument("--vae-batch", type=int, default=None, help="windows per VAE call (default: 4)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per row; the fastest is reported")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) one-window reference")
    p.add_argument(
        "--compile", action="store_true", help="compile the transformer blocks for the batched rows"
    )
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    args.steps = args.steps or (4 if args.student else 20)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    rows: list[tuple] = []

    def add(row: tuple) -> None:  # printed as soon as measured: a long GPU run cut short keeps its rows
        print("row: " + " | ".join(map(str, row)), flush=True)
        rows.append(row)

    for preset in args.preset:
        torch.manual_seed(0)
        model = build_pixcell(preset, guidance_embeds=args.student).to(device, dtype).eval()
        vae = build_vae("sd35" if "XL" in preset else "tiny", device, dtype)
        pipe = PixCellPipeline(model, vae, make_scheduler("lcm" if args.student else "dpm-solver"))
        tokens = model.config.caption_num_tokens
        px = pipe.image_size
        guidance = 2.0 if tokens == 1 else 1.2
        batch = args.batch or max(1, (64 if device.type == "cuda" else 8) // tokens)
        stride = args.stride or model.config.sample_size // 2
        what = f"{args.region_windows * px} px region, stride {stride}"
        region = tokens > 1
        ref = None
        if (
            region and not args.no_reference and not args.student
        ):  # first: with --compile it stays eager, as the published script
            ref = bench_region(
                pipe,
                args.region_windows,
                stride,
                args.steps,
                guidance,
                device,
                1,
                1,
                reference=True,
                repeats=args.repeats,
            )
            add((f"{what}, one-window reference", preset, "1 window, cond/uncond apart", f"{ref:.2f} s"))
        tag = ", compiled blocks" if compile_blocks(model, args.compile) else ""
        ips = bench_images(pipe, batch, args.steps, guidance, device, args.repeats)
        add((f"{px} px images", preset, f"batch {batch}{tag}", f"{ips:.2f} images/s"))
        if region:
            wb = args.window_batch or default_window_batch(device) or "all"
            vb = args.vae_batch or default_vae_batch(device)
            fast = bench_region(
                pipe,
                args.region_windows,
                stride,
                args.steps,
                guidance,
                device,
                args.window_batch,
                args.vae_batch,
                reference=False,
                repeats=args.repeats,
            )
            add((f"{what}, batched", preset, f"{wb} windows/forward, {vb}/VAE call{tag}", f"{fast:.2f} s"))
            if ref is not None:
                add(("batched speed-up", preset, "", f"{ref / fast:.2f}x"))
        del pipe, model, vae
        if device.type == "cuda":
            torch.cuda.empty_cache()

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    how = (
        "LCM steps of a student (guidance as its input)"
        if args.student
        else "DPM-Solver++ steps with guidance"
    )
    print(f"\n{args.steps} {how}, {args.dtype}, {name}, random weights\n")
    header = ("workload", "model", "setting", "result")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
