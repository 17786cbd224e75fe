"""Virtual staining: H&E images -> IHC images (PixCell-1024 + LoRA, UNI2-h embeddings translated by a flow).

    # published weights (MIST HER2 LoRA + flow MLP from the Hub; UNI2-h and the SD3.5 VAE are gated)
    python -m virtual_staining.stain --input he_images/ --stain HER2 --out ihc_images/
    # HER2Match weights, your own adapter and flow, guidance and steps
    python -m virtual_staining.stain --input he.png --stain HER2 --dataset HER2Match --out out/
    python -m virtual_staining.stain --input he/ --stain Ki67 --out out/ \\
        --lora work_dirs/vs_lora_ki67/lora_final.safetensors --flow work_dirs/vs_flow_ki67/flow_mlp_final.safetensors \\
        --guidance 1.2 --steps 20 --flow-steps 100

Inputs: an image file or a folder of them, RGB at 20x, sides multiples of 1024 px (larger images are stained
as 1024 px tiles and stitched). Outputs: `<out>/<input stem>.png`, one per input, same pixel size for
PixCell-1024. Image i (sorted by name) uses seed `--seed + i`, which fixes its noise: a run is reproducible image
by image (bit-exact at the same --batch-size; another batch size changes float summation order only).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusion.atomic import atomic_path
from diffusion.command import resolve_device, run_cli
from diffusion.data.ihc_pairs import MIST_STAINS, read_image
from diffusion.encoders import to_uint8
from diffusion.geometry import DTYPES, IMAGE_SUFFIXES
from diffusion.model.flow_mlp import FLOW_GRIDS
from diffusion.sampling.samplers import SAMPLERS
from tools.cli import add_model_args, add_runtime_args
from virtual_staining.published import BASE_MODEL, published_refs
from virtual_staining.stainer import SamplerSettings, VirtualStainer

log = logging.getLogger("virtual_staining.stain")
UNIT = 1024  # H&E px per model sample: PixCell-1024 takes 4 x 4 UNI tiles of 256 px


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m virtual_staining.stain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="H&E image file or folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stain", required=True, choices=MIST_STAINS, help="target IHC stain")
    p.add_argument(
        "--dataset",
        default="MIST",
        choices=["MIST", "HER2Match"],
        help="which published weights (--lora/--flow not given): trained on MIST or on HER2Match (HER2 only)",
    )
    p.add_argument("--lora", help="LoRA weights: file or OWNER/REPO:PATH (default: the published one)")
    p.add_argument("--flow", help="flow MLP weights: file or OWNER/REPO:PATH (default: the published one)")
    p.add_argument("--no-lora", action="store_true", help="sample the base model without an adapter")
    p.add_argument("--no-flow", action="store_true", help="condition on the H&E embeddings directly")
    add_model_args(p, model_default=BASE_MODEL)
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default="dpm-solver", choices=list(SAMPLERS))
    g.add_argument("--steps", type=int, default=None, help="diffusion steps (default: 20 for dpm-solver)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: 1.2, published)")
    g.add_argument("--flow-steps", type=int, default=100, help="Euler steps of the embedding flow")
    g.add_argument(
        "--flow-grid",
        default="uniform",
        choices=list(FLOW_GRIDS),
        help="flow time grid: uniform t = i/steps (default), or clipped linspace(1e-3, 1-1e-3) as a public "
        "script version of the published notebook does (uncertain; docs/virtual_staining.md)",
    )
    g.add_argument(
        "--rescale-norm",
        action="store_true",
        help="rescale translated tokens to the H&E tokens' mean norm (per image), as that script does",
    )
    g.add_argument(
        "--batch-size", type=int, default=4, help="1024 px units per forward pass (images per batch)"
    )
    add_runtime_args(p)
    return p


def list_inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--input {path}: no images ({', '.join(IMAGE_SUFFIXES)}) inside")
        return files
    raise FileNotFoundError(f"--input {path}: no such file or folder")


def check_inputs(files: list[Path], unit: int) -> None:
    """Every input readable, sides multiples of `unit`, output names unique: else one error naming the file."""
    stems: dict[str, Path] = {}
    for f in tqdm(files, desc="checking inputs", unit="img", disable=len(files) < 100):
        try:
            with Image.open(f) as im:
                w, h = im.size
        except Exception as err:
            raise ValueError(f"{f}: cannot read the image ({type(err).__name__})") from None
        if w % unit or h % unit:
            raise ValueError(f"{f}: {w}x{h} px; expected sides that are multiples of {unit} px")
        if f.stem in stems:
            raise ValueError(f"{f} and {stems[f.stem]} would both be written as {f.stem}.png")
        stems[f.stem] = f


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be >= 1")
    if args.flow_steps < 1:
        raise ValueError(f"--flow-steps {args.flow_steps}: must be >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    inputs = list_inputs(Path(args.input))
    check_inputs(inputs, UNIT)
    lora, flow = args.lora, args.flow
    if (lora is None and not args.no_lora) or (flow is None and not args.no_flow):
        pub_lora, pub_flow = published_refs(args.stain, args.dataset)
        lora = lora or pub_lora
        flow = flow or pub_flow
    device = resolve_device(args.device)
    settings = SamplerSettings(
        args.sampler, args.steps, args.guidance, args.flow_steps, args.flow_grid, args.rescale_norm
    )
    stainer = VirtualStainer.from_sources(
        model=args.model,
        lora=None if args.no_lora else lora,
        flow=None if args.no_flow else flow,
        vae=args.vae,
        uni=args.uni,
        device=device,
        dtype=DTYPES[args.dtype],
        settings=settings,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".png" if args.format == "png" else ".jpg"
    written = 0
    bar = tqdm(total=len(inputs), desc=f"staining {args.stain}", unit="img")
    for start in range(0, len(inputs), args.batch_size):
        batch = inputs[start : start + args.batch_size]
        images = [read_image(f) for f in batch]
        seeds = [args.seed + start + i for i in range(len(batch))]
        # Images of one batch must share a size to be stacked; group them (keeps seeds per image).
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(tuple(im.shape[-2:]), []).append(i)
        for idx in by_size.values():
            out = stainer(
                torch.stack([images[i] for i in idx]),
                seeds=[seeds[i] for i in idx],
                max_units=args.batch_size,
            )
            for i, arr in zip(idx, to_uint8(out)):
                target = out_dir / (batch[i].stem + suffix)
                with atomic_path(target) as tmp:
                    Image.fromarray(arr).save(tmp, format="PNG" if suffix == ".png" else "JPEG", quality=95)
                written += 1
        bar.update(len(batch))
    bar.close()
    print(f"wrote {written} {args.stain} image(s) to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
