"""Virtual staining at full size: time per 1024 px image for each step, and one LoRA training step.

    python -m benchmarks.bench_virtual_staining                 # real-size random models (GPU)
    python -m benchmarks.bench_virtual_staining --tiny          # tiny stand-ins (CPU smoke run)

Random weights with the published shapes (PixCell-XL/2-1024, UNI2-h ViT-g, an SD3.5-shaped VAE, the published
flow MLP, rank-4 LoRA): timings and memory are those of the real models, the pixels are noise. Prints a table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from diffusion.encoders import UNI2H_ARCH, UNI2H_KWARGS, UNIEncoder, resolve_timm_layers
from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.geometry import SD35_LATENT_SCALE, SD35_LATENT_SHIFT
from diffusion.model.flow_mlp import FlowMLP, flow_matching_loss
from diffusion.model.lora import add_lora, lora_parameters
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.samplers import make_scheduler
from diffusion.standins import TINY_FLOW, build_tiny_transformer, build_tiny_vae
from virtual_staining.stainer import SamplerSettings, VirtualStainer


def sd35_shaped_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        scaling_factor=SD35_LATENT_SCALE,
        shift_factor=SD35_LATENT_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def parts(tiny: bool, tmp: str):
    import timm

    if tiny:
        transformer = build_tiny_transformer()
        vae = build_tiny_vae(tmp)
        kwargs = {**UNI2H_KWARGS, "embed_dim": 96, "depth": 2, "num_heads": 2}
        flow = FlowMLP(**TINY_FLOW)
    else:
        transformer = build_pixcell("PixCell-XL/2-1024")
        vae = sd35_shaped_vae()
        kwargs = UNI2H_KWARGS
        flow = FlowMLP()
    uni = UNIEncoder(timm.create_model(UNI2H_ARCH, pretrained=False, **resolve_timm_layers(kwargs)))
    return transformer, vae, uni, flow


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=4, help="images per staining batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    import tempfile

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        transformer, vae, uni, flow = parts(args.tiny, tmp)
    add_lora(transformer)
    pipe = PixCellPipeline(transformer.eval(), vae.eval(), make_scheduler("dpm-solver")).to(device, dtype)
    stainer = VirtualStainer(uni.to(device, dtype), flow.to(device).eval(), pipe, SamplerSettings())
    b = args.batch
    x = torch.rand(b, 3, 1024, 1024, device=device)
    with torch.no_grad():
        tokens = stainer.embed(x)
        moved = stainer.translate(tokens)
        lat = torch.randn(b, 16, pipe.transformer.config.sample_size, pipe.transformer.config.sample_size)
        rows.append(("UNI embed (16 tiles)", timed(lambda: stainer.embed(x), device) / b))
        rows.append(("flow, 100 Euler steps", timed(lambda: stainer.translate(tokens), device) / b))
        rows.append(("sample 20 steps + decode", timed(lambda: stainer.generate(moved, lat), device, 1) / b))
        rows.append(("whole stain", timed(lambda: stainer(x.cpu()), device, 1) / b))

    # one LoRA training step (bf16 autocast, gradient checkpointing, batch 2), as train_lora.py does it
    model = pipe.transformer.float().train()
    model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    diffusion = GaussianDiffusion()
    s = model.config.sample_size
    x0 = torch.randn(2, 16, s, s, device=device)
    uni_tokens = torch.randn(2, model.config.caption_num_tokens, model.config.caption_channels, device=device)

    def train_step():
        t = diffusion.sample_timesteps(2, device)
        noise = torch.randn_like(x0)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = model(diffusion.q_sample(x0, t, noise), uni_tokens, t).sample
        loss = ((out[:, :16].float() - noise) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows.append(("LoRA train step (batch 2)", timed(train_step, device)))
    flow_train = flow.float().train()
    fopt = torch.optim.AdamW(flow_train.parameters(), lr=1e-4)
    he = torch.randn(64, flow_train.config.in_channels, device=device)

    def flow_step():
        loss = flow_matching_loss(flow_train, he, he + 1)
        loss.backward()
        fopt.step()
        fopt.zero_grad()

    rows.append(("flow train step (64 tokens)", timed(flow_step, device)))
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"virtual staining, {'tiny stand-ins' if args.tiny else 'real-size random models'}, {name}, {dtype}"
    )
    print(f"{'step':32s} {'seconds':>10s}")
    for label, sec in rows:
        unit = " / image" if "train" not in label else " / step"
        print(f"{label:32s} {sec:10.3f}{unit}")
    print(
        f"LoRA parameters: {sum(p.numel() for p in lora_parameters(model)):,}; peak GPU memory in training "
        f"{mem:.1f} GiB"
    )


if __name__ == "__main__":
    main()
