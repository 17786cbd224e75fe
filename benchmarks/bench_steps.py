"""Quality versus steps: every sampler at 2-50 steps and the distilled student at 1-8 steps on the same held-out
conditions and the same noise, with forwards per image, throughput and the Frechet distance to the real images.

    # the CPU demo (make demo; then the student: see docs/sampling.md "Few steps")
    python -m benchmarks.bench_steps --teacher demo_output/train --student demo_output/distill/student \
        --vae demo_output/standins/vae-standin --uni demo_output/standins/uni2h-standin \
        --index demo_output/patches/metadata/patch_names_all.hdf5 --keys cmu_heldout_256 --seeds 8
    # published weights: --teacher StonyBrook-CVLab/PixCell-256 --uni hf-hub:MahmoodLab/UNI2-h --device cuda ...

Each held-out condition is sampled `--seeds` times (image i, seed s: its own generator, the same for every row).
Per row: forwards per image (transformer rows counted by a hook: 2 per step with guidance, 1 for the student),
denoising throughput (latents/s, the sampler loop alone), end-to-end images/s (VAE decode included), and the
Frechet distance between UNI features (the stand-in UNI on the demo, UNI2-h when given) of the generated images
and of the real held-out images, with a bootstrap interval over both sets (`frechet_distance_bootstrap`), and the
encoder-free morphology distance (stains, nuclei, sharpness; diffusion/metrics/morphology.py: a learned stand-in
space can reward blur, the morphology measure counts the nuclei and edges that blur removes). Timings
of all rows come from one run, side by side; on a shared CPU they move with the load (read the ratios).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion.encoders import UNIEncoder, decode_latents, load_uni, load_vae
from diffusion.geometry import DTYPES, UNI_TILE
from diffusion.metrics.distances import frechet_distance_bootstrap
from diffusion.metrics.morphology import compare_features, fit_thresholds, morphology_features
from diffusion.sampling.conditions import IndexSource
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.runner import initial_noise
from diffusion.sampling.samplers import SAMPLERS, guidance_in_model, sampler_name

TEACHER_SAMPLERS = [s for s in SAMPLERS if s != "lcm"]


@dataclass
class Row:
    model: str  # "teacher" or "student"
    sampler: str
    steps: int
    guidance: float
    forwards_per_image: float
    latents_per_s: float  # denoising alone
    images_per_s: float  # denoising + VAE decode
    fd: float
    fd_low: float
    fd_high: float
    fd_std: float
    images: int
    morph: float = float("nan")  # morphology FD (no encoder: diffusion/metrics/morphology.py)
    morph_low: float = float("nan")
    morph_high: float = float("nan")


def held_out(args: argparse.Namespace, channels: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(N, 1, C) UNI tokens, (N, 256, 256, 3) real images and names of the held-out tiles."""
    source = IndexSource(1, UNI_TILE, channels, index_file=args.index, keys=args.keys, features=args.features)
    specs = source.specs()
    if args.max_conditions:
        specs = specs[: args.max_conditions]
    loaded = [source.load(s) for s in specs]
    if any(ld.image is None for ld in loaded):
        raise ValueError(f"--index {args.index}: held-out tiles need their real images")
    tokens = torch.from_numpy(np.stack([ld.tokens.reshape(1, -1) for ld in loaded])).float()
    return tokens, np.stack([ld.image for ld in loaded]), [s.name for s in specs]


@torch.no_grad()
def embed(uni: UNIEncoder, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] (or uint8) -> (N, C) UNI features, float64."""
    return (
        torch.cat([uni(images[i : i + batch]).float().cpu() for i in range(0, len(images), batch)])
        .double()
        .numpy()
    )


class ForwardCounter:
    """Counts the rows that go through the transformer (a forward pre-hook): forwards per image, measured."""

    def __init__(self, model: torch.nn.Module):
        self.rows = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        self.rows += x.shape[0]


@torch.no_grad()
def run_row(
    pipe: PixCellPipeline,
    counter: ForwardCounter,
    tokens: torch.Tensor,  # (N, 1, C) held-out conditions
    noise: torch.Tensor,  # (S*N, C, h, w) initial latents, seed-major
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    batch: int,
    device: torch.device,
) -> tuple[dict, torch.Tensor]:
    """Sample every (condition, seed) pair in batches; -> timings and the images (N*S, 3, H, W) in [0, 1]."""
    counter.rows = 0
    cond = tokens.repeat(len(seeds), 1, 1)  # (S*N, 1, C): seed-major
    t_denoise = t_decode = 0.0
    images = []
    for a in range(0, len(cond), batch):
        b = min(a + batch, len(cond))
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in range(a, b)]  # per-image SDE/LCM noise
        start = time.perf_counter()
        x = pipe(
            cond[a:b].to(device),
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=gens,
            latents=noise[a:b].to(device),
            output_type="latent",
            progress=False,
        ).images
        t_denoise += time.perf_counter() - start
        start = time.perf_counter()
        images.append(decode_latents(pipe.vae, x).float().cpu())
        t_decode += time.perf_counter() - start
    n = len(cond)
    timing = {
        "forwards_per_image": counter.rows / n,
        "latents_per_s": n / t_denoise,
        "images_per_s": n / (t_denoise + t_decode),
    }
    return timing, torch.cat(images)


def markdown(rows: list[Row]) -> str:
    head = (
        "| model | sampler | steps | w | forwards/image | latents/s | images/s | FD (95% CI) "
        "| morphology FD (95% CI) |"
    )
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.sampler} | {r.steps} | {r.guidance:g} | {r.forwards_per_image:g} | "
            f"{r.latents_per_s:.1f} | {r.images_per_s:.1f} | {r.fd:.2f} ({r.fd_low:.2f}-{r.fd_high:.2f}) | "
            f"{r.morph:.2f} ({r.morph_low:.2f}-{r.morph_high:.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="PixCell source (hub id, folder, .pth, work dir)")
    p.add_argument("--student", default=None, help="distilled student (folder, LoRA folder or work dir)")
    p.add_argument("--vae", required=True, help="VAE: hub id or folder")
    p.add_argument(
        "--uni", required=True, help="UNI encoder for the Frechet distance (and the conditions' space)"
    )
    p.add_argument("--index", required=True, help="index of the held-out tiles (their _uni.npy and images)")
    p.add_argument("--keys", nargs="+", default=None, help="index datasets of the held-out tiles")
    p.add_argument("--features", default="npy", choices=["npy", "packed"])
    p.add_argument("--max-conditions", type=int, default=None, help="first N held-out tiles only")
    p.add_argument("--seeds", type=int, default=8, help="images per held-out condition")
    p.add_argument("--samplers", nargs="+", default=TEACHER_SAMPLERS, choices=TEACHER_SAMPLERS)
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 20, 50], help="teacher sampler steps")
    p.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument(
        "--guidance", type=float, default=None, help="default: each model's (teacher 2.0 at 256 px)"
    )
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--out", default=None, help="write the table (.md) and rows (.json) here as well")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch_dtype = None if dtype == torch.float32 else dtype

    vae = load_vae(args.vae, torch_dtype=torch_dtype).to(device).eval()
    pipes = {"teacher": PixCellPipeline.from_parts(args.teacher, vae, torch_dtype=torch_dtype).to(device)}
    if args.student:
        pipes["student"] = PixCellPipeline.from_parts(args.student, vae, torch_dtype=torch_dtype).to(device)
        if not guidance_in_model(pipes["student"].transformer):
            raise ValueError(f"--student {args.student}: not a distilled student (no guidance embedding)")
    counters = {k: ForwardCounter(pipe.transformer) for k, pipe in pipes.items()}
    config = pipes["teacher"].transformer.config
    if config.caption_num_tokens != 1:
        raise ValueError("bench_steps compares 256 px models (one UNI token per image)")
    uni = load_uni(args.uni, device)
    uni.model.to(dtype)
    tokens, real, names = held_out(args, config.caption_channels)
    real_feats = embed(uni, torch.from_numpy(real).permute(0, 3, 1, 2).to(device))
    thresholds = fit_thresholds(list(real))
    real_morph = morphology_features(list(real), thresholds)
    n_images = len(tokens) * args.seeds
    noise, _ = initial_noise(
        list(range(n_images)), (config.in_channels, config.sample_size, config.sample_size)
    )

    plan = [("teacher", s, k) for s in args.samplers for k in args.steps]
    if args.student:
        plan += [("student", sampler_name(pipes["student"].scheduler), k) for k in args.student_steps]
    print(
        f"{len(names)} held-out conditions x {args.seeds} seeds = {n_images} images per row, {len(plan)} rows"
    )
    rows: list[Row] = []
    for kind, sampler, steps in tqdm(plan, desc="rows"):
        pipe = pipes[kind]
        pipe.set_sampler(sampler)
        guidance = pipe.sampling_options(steps, args.guidance).guidance
        timing, images = run_row(
            pipe, counters[kind], tokens, noise, range(args.seeds), steps, guidance, args.batch, device
        )
        est = frechet_distance_bootstrap(embed(uni, images.to(device)), real_feats, n_boot=args.n_boot)
        pixels = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        syn_morph = morphology_features(list(pixels), thresholds)
        morph = compare_features(real_morph, {"syn": syn_morph}, thresholds, n_boot=args.n_boot)[
            "syn"
        ].frechet
        rows.append(
            Row(
                kind,
                sampler,
                steps,
                guidance,
                **timing,
                fd=est.value,
                fd_low=est.low,
                fd_high=est.high,
                fd_std=est.std,
                images=n_images,
                morph=morph.value,
                morph_low=morph.low,
                morph_high=morph.high,
            )
        )
        r = rows[-1]
        tqdm.write(
            f"{kind} {sampler} {steps}: FD {r.fd:.2f} [{r.fd_low:.2f}, {r.fd_high:.2f}], morphology "
            f"{r.morph:.2f} [{r.morph_low:.2f}, {r.morph_high:.2f}], "
            f"{r.forwards_per_image:g} fwd/img, {r.latents_per_s:.1f} latents/s, {r.images_per_s:.1f} img/s"
        )

    table = markdown(rows)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(f"\n{len(names)} held-out conditions x {args.seeds} seeds, {args.dtype}, {device_name}\n\n{table}")
    summary = acceptance(rows)
    if summary:
        print("\n" + summary)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table + "\n\n" + summary + "\n")
        out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def acceptance(rows: list[Row]) -> str:
    """The 4-step student beside the 20-step guided DPM-Solver++ teacher (the published default)."""
    ref = next(
        (r for r in rows if r.model == "teacher" and r.sampler == "dpm-solver" and r.steps == 20), None
    )
    st = next((r for r in rows if r.model == "student" and r.steps == 4), None)
    if ref is None or st is None:
        return ""
    return (
        f"4-step student vs 20-step guided teacher (DPM-Solver++): FD {st.fd:.2f} +- {st.fd_std:.2f} vs "
        f"{ref.fd:.2f} +- {ref.fd_std:.2f} ({100 * (st.fd / ref.fd - 1):+.0f}%), morphology FD {st.morph:.2f} "
        f"[{st.morph_low:.2f}, {st.morph_high:.2f}] vs {ref.morph:.2f} [{ref.morph_low:.2f}, {ref.morph_high:.2f}] "
        f"({100 * (st.morph / ref.morph - 1):+.0f}%), forwards per image "
        f"{ref.forwards_per_image:g} -> {st.forwards_per_image:g} ({ref.forwards_per_image / st.forwards_per_image:.1f}x "
        f"fewer), denoising {st.latents_per_s / ref.latents_per_s:.1f}x the latents/s, end to end "
        f"{st.images_per_s:.1f} vs {ref.images_per_s:.1f} images/s ({st.images_per_s / ref.images_per_s:.1f}x)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
