"""PixCell in the browser: pick or upload an H&E patch, see synthetic variants of it, stain it (a Gradio app).

    make demo && make app                   # the CPU demo's stand-in models and its slide, http://127.0.0.1:7860
    python -m tools.app --model StonyBrook-CVLab/PixCell-256 --uni hf-hub:MahmoodLab/UNI2-h \\
        --slide my_slide.svs --device cuda  # the real models (gated: accept their terms, log in)
    python -m tools.app --model StonyBrook-CVLab/PixCell-1024 --stain-published --device cuda   # + staining tab

Tabs:
  Variants          the reference patch (a click on a tile of the slide thumbnail, or an upload: 256 px, or
                    1024 px for PixCell-1024; larger images are centre-cropped, smaller ones refused) -> N
                    variants sampled on its UNI tokens, each with its UNI-space cosine similarity to the reference;
                    download as PNG (lossless, settings inside) + settings.json
  Reference-free    only with --prior: N images with no reference at all, their UNI conditions drawn from a
                    trained UNI prior (train_scripts/train_prior.py), per label when it was trained with labels
  Virtual staining  only with --stain / --stain-published: an H&E 1024 px image -> the chosen IHC stain

The app listens on 127.0.0.1 (this machine only): reach it from elsewhere through an SSH tunnel, or listen on the
network (--host 0.0.0.0) with a login, --auth USER:PASS or --auth-file FILE (Gradio's auth); without one it warns
in the terminal and on the page (docs/app.md).

Every model is loaded before the server starts, so a missing or gated one is one `error:` line (exit 2). The
queue runs one generation at a time (two browser tabs wait their turn); bad uploads get a message on the page.
Same model flags as tools/sample.py (--model, --vae, --uni); with none of them, the app serves `make demo`'s
stand-ins from --demo (default demo_output/) and says so on the page.

A few-step student (train_scripts/train_distill.py) is a --model like any other; its recorded sampler, steps
and guidance (LCM, 4 steps) are what the controls start from: the fast mode. Adding a tab: a flag in `build_parser`, its model loaded in
`load_context` (None when the flag is absent), and a `*_tab(ctx)` builder called from `build_app` only when the
model is there, like `reference_free_tab` and `staining_tab`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffusion.atomic import atomic_path
from diffusion.command import resolve_device, run_cli
from diffusion.data.slides import SlideError
from diffusion.encoders import UNIEncoder
from diffusion.geometry import DTYPES
from diffusion.sampling.loading import load_pipeline, load_uni_encoder
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.runner import model_reference
from diffusion.sampling.samplers import DEFAULT_STEPS, SAMPLERS, resolve_sampling, sampler_name
from diffusion.sampling.variants import (
    MIN_TISSUE,
    ReferenceImageError,
    SlideTiles,
    make_variants,
    read_reference,
    reference_size,
)
from tools.cli import add_model_args, add_runtime_args, pipeline_sources

DEMO_PARTS = {"model": "train", "vae": "standins/vae-standin", "uni": "standins/uni2h-standin"}
# System fonts: the default theme fetches Google Fonts, which offline sites (and CI) cannot reach.
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO = ["ui-monospace", "monospace"]


#################################################################################
#                               Flags and models                                #
#################################################################################


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p, model_default="")
    # None = not given: with no model flag at all the app serves the demo's stand-ins (see resolve_sources).
    # The sampler is chosen per request; load_pipeline starts the pipeline with the default one.
    p.set_defaults(model=None, vae=None, uni=None, sampler="dpm-solver")
    p.add_argument(
        "--demo", default="demo_output", help="`make demo`'s output, served when --model is not given"
    )
    p.add_argument("--slide", help="whole-slide image (openslide/tiffslide) whose tiles can be clicked")
    p.add_argument("--slide-mpp", type=float, help="level-0 um/px of --slide when its metadata has none")
    st = p.add_argument_group("virtual staining tab (shown only when weights are given)")
    st.add_argument(
        "--stain",
        nargs=3,
        action="append",
        metavar=("NAME", "LORA", "FLOW"),
        default=[],
        help="a stain target: its name, LoRA and flow MLP (files or OWNER/REPO:PATH); repeatable",
    )
    st.add_argument("--stain-published", action="store_true", help="every published target (MIST, HER2Match)")
    st.add_argument(
        "--stain-model", default=None, help="PixCell-1024 source for staining (default: the Hub's)"
    )
    add_runtime_args(p)
    p.add_argument(
        "--prior",
        help="UNI prior (train_scripts/train_prior.py work dir or prior/ folder): the reference-free tab",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (GPU)")
    srv = p.add_argument_group("server")
    srv.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default: this machine only; 0.0.0.0: every interface, with --auth)",
    )
    srv.add_argument("--port", type=int, default=7860)
    srv.add_argument("--auth", metavar="USER:PASS", help="require this login (Gradio's auth)")
    srv.add_argument(
        "--auth-file", help="logins, one USER:PASS a line (kept out of the process list and shell history)"
    )
    srv.add_argument("--max-variants", type=int, default=8, help="most variants per request")
    srv.add_argument("--queue-size", type=int, default=16, help="most requests waiting in the queue")
    return p


def resolve_sources(args: argparse.Namespace) -> str | None:
    """Fill --model/--vae/--uni; returns the demo folder when serving the demo's stand-ins, else None."""
    from diffusion.encoders import SD35_VAE_ID, UNI2H_HUB_ID

    if args.model is None and args.vae is None and args.uni is None:
        demo = Path(args.demo)
        if not (demo / ".done" / "train.json").is_file():
            raise FileNotFoundError(
                f"--demo {demo}: no finished demo here; run `make demo` first, or pass --model/--vae/--uni "
                "(e.g. --model StonyBrook-CVLab/PixCell-256 --uni hf-hub:MahmoodLab/UNI2-h)"
            )
        for key, rel in DEMO_PARTS.items():
            setattr(args, key, str(demo / rel))
        if args.slide is None:
            record = json.loads((demo / ".done" / "slide.json").read_text())
            args.slide = record["info"]["slide"]
        if args.prior is None and (demo / ".done" / "prior.json").is_file():  # the demo's UNI prior stage
            args.prior = str(demo / "prior")
        return str(demo)
    if args.model is None:
        raise ValueError("--vae/--uni given without --model: pass the PixCell transformer too")
    args.vae = args.vae or SD35_VAE_ID
    args.uni = args.uni or UNI2H_HUB_ID
    return None


def stain_targets(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """{label: (LoRA ref, flow ref)} from --stain and --stain-published."""
    targets: dict[str, tuple[str, str]] = {}
    if args.stain_published:
        from virtual_staining.published import TARGETS, published_refs

        for dataset, stain in TARGETS:
            targets[f"{stain} ({dataset})"] = published_refs(stain, dataset)
    for name, lora, flow in args.stain:
        if name in targets:
            raise ValueError(f"--stain {name}: given twice")
        targets[name] = (lora, flow)
    return targets


@dataclass
class AppContext:
    """Everything the handlers need, loaded once before the server starts."""

    pipe: PixCellPipeline
    uni: UNIEncoder
    sources: dict[str, str]  # model / vae / uni as given (hub id or path)
    refs: dict[str, str]  # the same as the settings JSON pins them: hub id or sha256 of the local weights
    size: int  # reference side, px
    device: str
    dtype: str
    seed: int
    fmt: str
    max_variants: int
    demo: str | None = None
    slide: SlideTiles | None = None
    stainers: dict = field(default_factory=dict)  # label -> VirtualStainer
    stain_sources: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> its model, LoRA, flow
    stain_slide: SlideTiles | None = None
    prior: object | None = None  # a UNIPrior (--prior): the reference-free tab
    out_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pixcell_app_")))

    def provenance(self, parts: Sequence[str] = ("model", "vae", "uni")) -> dict[str, str]:
        """What the settings JSON records about the models: their sources and the pinned references."""
        return {**{k: self.sources[k] for k in parts}, **{f"{k}_ref": self.refs[k] for k in parts}}


def open_slide_tiles(args: argparse.Namespace, size: int) -> SlideTiles | None:
    if args.slide is None:
        return None
    try:
        return SlideTiles(args.slide, size, mpp=args.slide_mpp)
    except SlideError as err:
        raise ValueError(f"--slide: {str(err).replace('pass --mpp', 'pass --slide-mpp')}") from None


def load_context(args: argparse.Namespace) -> AppContext:
    """Load every model (one-line errors: missing paths, gated weights, mismatched sizes) before serving."""
    # huggingface_hub warns about a deprecated argument when a hub load fails: keep the error to one line
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    if args.max_variants < 1:
        raise ValueError(f"--max-variants {args.max_variants}: expected >= 1")
    demo = resolve_sources(args)
    targets = stain_targets(args)
    device = resolve_device(args.device)
    pipe, model_ref, vae_ref = load_pipeline(pipeline_sources(args), device)
    uni = load_uni_encoder(args.uni, device, args.dtype, pipe.transformer.config.caption_channels)
    ctx = AppContext(
        pipe=pipe,
        uni=uni,
        sources={"model": args.model, "vae": args.vae, "uni": args.uni},
        refs={"model": model_ref, "vae": vae_ref, "uni": model_reference(args.uni)},
        size=reference_size(pipe),
        device=str(device),
        dtype=args.dtype,
        seed=args.seed,
        fmt=args.format,
        max_variants=args.max_variants,
        demo=demo,
        slide=open_slide_tiles(args, reference_size(pipe)),
    )
    if args.prior:
        from diffusion.prior.model import check_prior_fits, load_prior, prior_folder

        ctx.prior = load_prior(prior_folder(args.prior), device=device)
        t = pipe.transformer.config
        check_prior_fits(ctx.prior, t.caption_num_tokens, t.caption_channels, where=f"--prior {args.prior}")
        ctx.sources["prior"], ctx.refs["prior"] = args.prior, model_reference(prior_folder(args.prior))
    if targets:
        from virtual_staining.published import BASE_MODEL
        from virtual_staining.stainer import VirtualStainer

        base = args.stain_model or BASE_MODEL
        for label, (lora, flow) in targets.items():
            try:
                ctx.stainers[label] = VirtualStainer.from_sources(
                    model=base,
                    lora=lora,
                    flow=flow,
                    vae=pipe.vae,
                    uni=uni,
                    device=device,
                    dtype=DTYPES[args.dtype],
                )
            except (OSError, RuntimeError, ValueError) as err:  # name the flags the failing part came from
                raise type(err)(f"--stain {label} (with --stain-model {base}): {err}") from None
            ctx.stain_sources[label] = {"model": base, "lora": str(lora), "flow": str(flow)}
        unit = next(iter(ctx.stainers.values())).unit_size
        ctx.stain_slide = open_slide_tiles(args, unit) if args.slide else None
    atexit.register(shutil.rmtree, ctx.out_root, True)
    return ctx


#################################################################################
#                                  Outputs                                      #
#################################################################################


def request_dir(ctx: AppContext, keep_s: float = 3600) -> Path:
    """A fresh folder for one request's downloads; those older than `keep_s` are removed (Gradio has copied
    them into its own cache by then)."""
    now = time.time()
    for old in ctx.out_root.iterdir():
        if now - old.stat().st_mtime > keep_s:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=ctx.out_root))


def save_image(array: np.ndarray, path: Path, settings: dict, fmt: str) -> Path:
    """PNG (default, lossless) with the settings as a text chunk, or JPEG with --format jpeg; atomic."""
    with atomic_path(path) as tmp:
        if fmt == "png":
            info = PngInfo()
            info.add_text("pixcell", json.dumps(settings, sort_keys=True))
            Image.fromarray(array).save(tmp, format="PNG", pnginfo=info)
        else:
            Image.fromarray(array).save(tmp, format="JPEG", quality=95, subsampling=0)
    return path


def save_json(data: dict, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    return path


@contextmanager
def run_clock() -> Iterator[dict]:
    """When one model run started and finished (UTC) and its seconds: kept in the settings JSON."""
    record = {"started": datetime.now(timezone.utc).isoformat()}
    start = time.perf_counter()
    yield record
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["finished"] = datetime.now(timezone.utc).isoformat()


def check_guidance(guidance: float) -> None:
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance {guidance}: expected a number >= 0")


def problem(err: Exception) -> str:
    """A message for the page (one line, no traceback)."""
    return f"**Cannot do that:** {err}"


#################################################################################
#                                  Handlers                                     #
#################################################################################


def load_upload(path: str | None, size: int) -> tuple[np.ndarray | None, str, str]:
    """An uploaded file -> (reference image, its description, status message)."""
    if not path:
        return None, "", ""
    name = Path(path).name  # Gradio keeps the uploaded file's own name
    try:
        ref = read_reference(path, size, name)
    except ReferenceImageError as err:
        return None, "", problem(err)
    return ref.image, f"upload: {name}", f"Reference: {ref.note or name} ({size}x{size} px)."


def pick_tile(tiles: SlideTiles, x: float, y: float) -> tuple[Image.Image, np.ndarray | None, str, str]:
    """A click at thumbnail (x, y) -> (thumbnail with the tile framed, tile, its description, status)."""
    cell = tiles.cell_at(x, y)
    if cell is None:
        return tiles.draw(), None, "", "That point is outside the tile grid: click inside the slide."
    tile = tiles.tile(*cell)
    source = "slide: " + tile.describe(tiles.path.name)
    note = f"Reference: {source}."
    if tile.tissue < MIN_TISSUE:
        note += f" Mostly background ({tile.tissue:.0%} tissue): variants will be mostly glass."
    return tiles.draw(cell), tile.image, source, note


def save_gallery(
    ctx: AppContext,
    images: Sequence[np.ndarray],  # uint8 (H, W, 3)
    stems: Sequence[str],
    settings: Sequence[dict],  # each image's, written inside its PNG
    captions: Sequence[str],
) -> tuple[list[tuple[str, str]], list[str]]:
    """One request's images in a fresh download folder: -> (gallery items (file, caption), files)."""
    folder = request_dir(ctx)
    suffix = ".png" if ctx.fmt == "png" else ".jpg"
    paths = [
        str(save_image(im, folder / f"{stem}{suffix}", one, ctx.fmt))
        for im, stem, one in zip(images, stems, settings)
    ]
    return list(zip(paths, captions)), paths


def generate_variants(
    ctx: AppContext,
    reference: str | None,
    source: str,
    n: float,
    sampler: str,
    steps: float,
    guidance: float,
    seed: float,
    strength: float = 1.0,
    mask: str | None = None,
) -> tuple[list[tuple[str, str]], list[str], str]:
    """The Generate button: -> (gallery items (file, caption), download files, status). `strength` below 1
    starts every variant from the noised reference (img2img, SDEdit); a `mask` file redraws only its white part
    (inpainting; resized to the reference with nearest neighbours)."""
    if not reference:
        return [], [], "Pick a tile on the slide or upload an H&E patch first."
    try:
        n, steps, seed = int(n), int(steps), int(seed)
        check_guidance(guidance)
        ref = read_reference(reference, ctx.size, source or Path(reference).name)
        keep = None
        if mask:
            try:
                keep = Image.open(mask).convert("L").resize((ctx.size, ctx.size), Image.NEAREST)
            except (OSError, Image.DecompressionBombError) as err:
                raise ValueError(f"mask: not a readable image ({err})") from None
        with run_clock() as clock:
            out = make_variants(
                ctx.pipe,
                ctx.uni,
                ref.image,
                n,
                sampler,
                steps,
                float(guidance),
                seed,
                strength=float(strength),
                mask=None if keep is None else np.asarray(keep),
            )
    except ValueError as err:
        return [], [], problem(err)
    settings = {
        **ctx.provenance(),
        "reference": source or "api upload",
        "reference_px": ctx.size,
        "sampler": out.sampler,
        "steps": out.steps,
        "guidance": out.guidance,
        "strength": float(strength),
        "inpainting_mask": bool(mask),
        "dtype": ctx.dtype,
        "device": ctx.device,
    }
    rows = [{"seed": s, "uni_cosine": round(cos, 4)} for s, cos in zip(out.seeds, out.cosine)]
    gallery, files = save_gallery(
        ctx,
        out.images,
        [f"pixcell_variant_{i + 1}_seed{r['seed']}" for i, r in enumerate(rows)],
        [{**settings, **r} for r in rows],
        [f"seed {r['seed']} · UNI cosine {c:.3f}" for r, c in zip(rows, out.cosine)],
    )
    for row, path in zip(rows, files):
        row["file"] = Path(path).name
    settings_file = Path(files[0]).parent / "pixcell_variants_settings.json"
    files.append(str(save_json({**settings, **clock, "variants": rows}, settings_file)))
    status = (
        f"{n} variant(s) in {clock['seconds']:.1f} s ({out.sampler}, {out.steps} steps, guidance {out.guidance:g}, "
        f"seeds {out.seeds[0]}..{out.seeds[-1]}); UNI cosine to the reference: mean {np.mean(out.cosine):.3f}."
    )
    return gallery, files, status


def generate_reference_free(
    ctx: AppContext,
    n: float,
    label: str | None,
    prior_guidance: float,
    steps: float,
    guidance: float,
    seed: float,
) -> tuple[list[tuple[str, str]], list[str], str]:
    """The reference-free Generate button: UNI conditions drawn from the prior (for `label`), then PixCell.
    -> (gallery items (file, caption), download files, status)."""
    from diffusion.encoders import to_uint8
    from diffusion.prior.sampling import sample_images

    try:
        n, steps, seed = int(n), int(steps), int(seed)
        check_guidance(guidance)
        check_guidance(prior_guidance)
        label = label or None
        with run_clock() as clock:
            out = sample_images(
                ctx.pipe,
                ctx.prior,
                n,
                label,
                prior_guidance=float(prior_guidance),
                generator=torch.Generator().manual_seed(seed),  # the prior's noise, then the images'
                guidance_scale=float(guidance),
                num_inference_steps=steps,
                output_type="pt",
                progress=False,
            )
    except ValueError as err:
        return [], [], problem(err)
    settings = {
        **ctx.provenance(("model", "vae", "prior")),
        "label": label,
        "prior_guidance": float(prior_guidance),
        "sampler": sampler_name(ctx.pipe.scheduler),
        "steps": steps,
        "guidance": float(guidance),
        "seed": seed,
        "dtype": ctx.dtype,
        "device": ctx.device,
    }
    gallery, files = save_gallery(
        ctx,
        list(to_uint8(out.images)),
        [f"pixcell_reference_free_{i + 1}_seed{seed}" for i in range(n)],
        [{**settings, "index": i} for i in range(n)],
        [f"{label or 'any label'} · #{i + 1}" for i in range(n)],
    )
    settings_file = Path(files[0]).parent / "pixcell_reference_free_settings.json"
    files.append(str(save_json({**settings, **clock, "n": n}, settings_file)))
    status = (
        f"{n} image(s) from the UNI prior ({label or 'any label'}) in {clock['seconds']:.1f} s, seed {seed}."
    )
    return gallery, files, status


def stain_image(
    ctx: AppContext,
    reference: str | None,
    source: str,
    target: str,
    steps: float,
    guidance: float,
    seed: float,
) -> tuple[np.ndarray | None, list[str], str]:
    """The Stain button: -> (stained image, download files, status)."""
    from virtual_staining.stainer import SamplerSettings

    if not reference:
        return None, [], "Pick a tile on the slide or upload an H&E image first."
    if target not in ctx.stainers:
        return None, [], problem(ValueError(f"stain {target!r}: expected one of {', '.join(ctx.stainers)}"))
    stainer = ctx.stainers[target]
    try:
        ref = read_reference(reference, stainer.unit_size, source or Path(reference).name)
        check_guidance(guidance)
        stainer.settings = SamplerSettings(num_inference_steps=int(steps), guidance_scale=float(guidance))
        image = torch.from_numpy(ref.image).permute(2, 0, 1)[None].float() / 255
        with run_clock() as clock:
            out = stainer(image, seeds=[int(seed)], progress=True)
    except ValueError as err:
        return None, [], problem(err)
    from diffusion.encoders import to_uint8

    array = to_uint8(out)[0]
    settings = {
        **ctx.provenance(("vae", "uni")),
        **ctx.stain_sources[target],  # the staining model, not the Variants tab's
        "stain": target,
        "reference": source or "api upload",
        "steps": int(steps),
        "guidance": float(guidance),
        "seed": int(seed),
        "flow_steps": stainer.settings.flow_steps,
        "dtype": ctx.dtype,
        "device": ctx.device,
    }
    folder = request_dir(ctx)
    suffix = ".png" if ctx.fmt == "png" else ".jpg"
    slug = target.split()[0].lower()
    files = [
        str(save_image(array, folder / f"pixcell_stain_{slug}_seed{int(seed)}{suffix}", settings, ctx.fmt)),
        str(save_json({**settings, **clock}, folder / "pixcell_stain_settings.json")),
    ]
    return array, files, f"{target} in {clock['seconds']:.1f} s."


#################################################################################
#                                     Page                                      #
#################################################################################


def header(ctx: AppContext) -> str:
    lines = ["# PixCell: synthetic H&E from UNI2-h embeddings"]
    if ctx.demo:
        lines.append(
            f"**Demo models.** This page serves the stand-ins made by `make demo` (`{ctx.demo}/`): a small PixCell "
            "trained for a few minutes on the CPU, a small VAE and a small UNI2-h-shaped encoder. They are not "
            "PixCell, UNI2-h or the SD3.5 VAE; start the app with `--model/--vae/--uni` for the real ones."
        )
    lines.append(
        f"Model `{ctx.sources['model']}` · VAE `{ctx.sources['vae']}` · UNI `{ctx.sources['uni']}` · "
        f"{ctx.size} px references · {ctx.device}, {ctx.dtype}"
    )
    return "\n\n".join(lines)


def reference_picker(tiles: SlideTiles | None, size: int, prefix: str, status: gr.Markdown):
    """Two columns (inside a Row): the slide thumbnail, when there is a slide, and the upload with the chosen
    reference; a click or an upload sets the reference. Returns the (reference, source) components; messages
    go to `status` (created unrendered by the caller, who places it)."""
    if tiles is not None:
        with gr.Column(scale=3, min_width=320):
            thumb = gr.Image(
                tiles.draw(),
                label=f"Click a tile of {tiles.path.name} ({size} px, 20x)",
                interactive=False,
                elem_id=f"{prefix}-thumbnail",
                format="png",
                height=520,
            )
    with gr.Column(scale=2, min_width=240):
        upload = gr.File(
            label=f"…or upload an H&E patch ({size} px, 20x)", elem_id=f"{prefix}-upload", height=120
        )
        reference = gr.Image(
            label="Reference",
            type="filepath",
            format="png",
            interactive=False,
            elem_id=f"{prefix}-reference",
            height=260,
        )
        source = gr.Textbox(label="Reference source", interactive=False, elem_id=f"{prefix}-source", lines=2)
    upload.upload(
        lambda path: load_upload(path, size),
        inputs=upload,
        outputs=[reference, source, status],
        api_name=f"{prefix}_load_reference",
        concurrency_limit=None,  # cheap: never waits behind a generation
    )
    if tiles is not None:

        def on_select(evt: gr.SelectData):
            x, y = evt.index
            return pick_tile(tiles, x, y)

        thumb.select(
            on_select, None, [thumb, reference, source, status], api_name=False, concurrency_limit=None
        )
    return reference, source


def tab_defaults(pipe: PixCellPipeline) -> tuple[str, int, float]:
    """(sampler, steps, guidance) the controls start from: those recorded beside the model (a few-step student:
    LCM, 4 steps, its guidance input; the fast mode), else DPM-Solver++ with the published defaults."""
    sampler = pipe.defaults.get("sampler", "dpm-solver")
    o = resolve_sampling(sampler, None, None, pipe.transformer.config.caption_num_tokens, pipe.defaults)
    return o.sampler, o.steps, o.guidance


def on_model_run(
    button: gr.Button, fn: Callable[..., object], inputs: list, outputs: list, api_name: str
) -> None:
    """A button that runs a model: every such event shares the concurrency group "model", so the whole app makes
    one model run at a time (the others wait in the queue); `api_name` is its endpoint in the Gradio API."""
    button.click(
        fn, inputs=inputs, outputs=outputs, api_name=api_name, concurrency_id="model", concurrency_limit=1
    )


def variants_tab(ctx: AppContext) -> None:
    sampler0, steps0, guidance0 = tab_defaults(ctx.pipe)
    status = gr.Markdown(elem_id="variants-status", render=False)
    with gr.Row(equal_height=False):
        reference, source = reference_picker(ctx.slide, ctx.size, "variants", status)
        with gr.Column(scale=3, min_width=280):
            n = gr.Slider(
                1,
                ctx.max_variants,
                value=min(4, ctx.max_variants),
                step=1,
                label="Variants",
                elem_id="variants-n",
            )
            sampler = gr.Dropdown(list(SAMPLERS), value=sampler0, label="Sampler", elem_id="variants-sampler")
            steps = gr.Slider(1, 200, value=steps0, step=1, label="Steps", elem_id="variants-steps")
            guidance = gr.Slider(
                0,
                6,
                value=guidance0,
                step=0.1,
                label="Guidance w (eps_u + w (eps_c - eps_u))",
                elem_id="variants-guidance",
            )
            seed = gr.Number(
                ctx.seed, precision=0, label="Seed (variant i: seed + i)", elem_id="variants-seed"
            )
            strength = gr.Slider(
                0.05,
                1,
                value=1,
                step=0.05,
                label="Strength: 1 = from noise; lower keeps the reference's layout (img2img, SDEdit)",
                elem_id="variants-strength",
            )
            mask = gr.Image(
                type="filepath",
                image_mode="L",
                label="Inpainting mask (optional): white is redrawn, black keeps the reference",
                elem_id="variants-mask",
                height=160,
            )
            button = gr.Button("Generate variants", variant="primary", elem_id="variants-generate")
            status.render()
    gallery = gr.Gallery(
        label="Variants (caption: seed, UNI cosine similarity to the reference)",
        columns=4,
        format="png",
        elem_id="variants-gallery",
        height=None,
    )
    files = gr.File(
        label="Download: PNG (settings inside) + settings.json",
        file_count="multiple",
        elem_id="variants-files",
    )
    sampler.change(lambda s: DEFAULT_STEPS[s], sampler, steps, api_name=False, concurrency_limit=None)

    def run(
        reference: str | None,  # the file path of the chosen reference (gr.Image type filepath)
        source: str | None,
        n: float,
        sampler: str,
        steps: float,
        guidance: float,
        seed: float,
        strength: float = 1.0,
        mask: str | None = None,  # the file path of an uploaded mask
        progress: gr.Progress = gr.Progress(track_tqdm=True),
    ) -> tuple:
        # progress: Gradio shows the sampler's tqdm bar ("denoising k/steps") on the outputs
        return generate_variants(ctx, reference, source, n, sampler, steps, guidance, seed, strength, mask)

    on_model_run(
        button,
        run,
        [reference, source, n, sampler, steps, guidance, seed, strength, mask],
        [gallery, files, status],
        "generate",
    )


def staining_tab(ctx: AppContext) -> None:
    first = next(iter(ctx.stainers.values()))
    o = resolve_sampling("dpm-solver", None, None, first.pipe.transformer.config.caption_num_tokens)
    steps0, guidance0 = o.steps, o.guidance
    status = gr.Markdown(elem_id="stain-status", render=False)
    with gr.Row(equal_height=False):
        reference, source = reference_picker(ctx.stain_slide, first.unit_size, "stain", status)
        with gr.Column(scale=3, min_width=280):
            target = gr.Dropdown(
                list(ctx.stainers), value=next(iter(ctx.stainers)), label="Stain", elem_id="stain-target"
            )
            steps = gr.Slider(1, 200, value=steps0, step=1, label="Steps (DPM-Solver++)")
            guidance = gr.Slider(
                0, 6, value=guidance0, step=0.1, label=f"Guidance (published: {guidance0:g})"
            )
            seed = gr.Number(ctx.seed, precision=0, label="Seed")
            button = gr.Button("Stain", variant="primary", elem_id="stain-run")
            status.render()
            output = gr.Image(label="Virtual stain", format="png", interactive=False, elem_id="stain-output")
            files = gr.File(label="Download", file_count="multiple", elem_id="stain-files")

    def run(
        reference: str | None,  # the file path of the chosen reference (gr.Image type filepath)
        source: str | None,
        target: str,
        steps: float,
        guidance: float,
        seed: float,
        progress: gr.Progress = gr.Progress(track_tqdm=True),
    ) -> tuple:
        return stain_image(ctx, reference, source, target, steps, guidance, seed)

    on_model_run(
        button, run, [reference, source, target, steps, guidance, seed], [output, files, status], "stain"
    )


def reference_free_tab(ctx: AppContext) -> None:
    sampler0, steps0, guidance0 = tab_defaults(ctx.pipe)
    labels = ctx.prior.labels
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=280):
            gr.Markdown(
                "No reference image: the UNI prior draws the conditions (for the chosen label), then PixCell "
                "draws the images."
            )
            label = gr.Dropdown(
                ["", *labels],
                value="",
                label="Label (empty: any)",
                elem_id="free-label",
                visible=bool(labels),
            )
            n = gr.Slider(1, ctx.max_variants, value=min(4, ctx.max_variants), step=1, label="Images")
            prior_guidance = gr.Slider(0, 6, value=1.0, step=0.1, label="Prior label guidance (1: none)")
            steps = gr.Slider(1, 200, value=steps0, step=1, label=f"Steps ({sampler0})")
            guidance = gr.Slider(0, 6, value=guidance0, step=0.1, label="Guidance w")
            seed = gr.Number(ctx.seed, precision=0, label="Seed")
            button = gr.Button("Generate without a reference", variant="primary", elem_id="free-generate")
            status = gr.Markdown(elem_id="free-status")
    gallery = gr.Gallery(label="Reference-free images", columns=4, format="png", elem_id="free-gallery")
    files = gr.File(label="Download: PNG (settings inside) + settings.json", file_count="multiple")

    def run(
        label: str | None,
        n: float,
        prior_guidance: float,
        steps: float,
        guidance: float,
        seed: float,
        progress: gr.Progress = gr.Progress(track_tqdm=True),
    ) -> tuple:
        return generate_reference_free(ctx, n, label, prior_guidance, steps, guidance, seed)

    on_model_run(
        button,
        run,
        [label, n, prior_guidance, steps, guidance, seed],
        [gallery, files, status],
        "reference_free",
    )


#################################################################################
#                               Network exposure                                #
#################################################################################

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def read_auth(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """--auth USER:PASS and the lines of --auth-file as Gradio's auth list; None when neither is given."""
    given: list[tuple[str, str]] = []
    entries = [("--auth", args.auth)] if args.auth else []
    if args.auth_file:
        path = Path(args.auth_file)
        if not path.is_file():
            raise FileNotFoundError(f"--auth-file {path}: no such file")
        lines = [line.strip() for line in path.read_text().splitlines()]
        entries += [(f"--auth-file {path} line {i + 1}", line) for i, line in enumerate(lines) if line]
        if not lines or not any(lines):
            raise ValueError(f"--auth-file {path}: no USER:PASS line inside")
    for where, text in entries:
        user, sep, password = text.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{where}: expected USER:PASS (a user name and a password, neither empty)")
        given.append((user, password))
    return given or None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to a public interface
        return False


def exposure_warning(host: str, auth: list[tuple[str, str]] | None) -> str | None:
    """The warning of an app bound to the network without a login (terminal and page), else None."""
    if auth or is_loopback(host):
        return None
    return (
        f"--host {host} serves this app to the network without a login: anyone who reaches this port can run "
        "the gated UNI2-h and PixCell weights on this machine. Pass --auth USER:PASS (or --auth-file), or keep "
        "the default --host 127.0.0.1 and reach it through an SSH tunnel (docs/app.md)."
    )


def check_port(host: str, port: int) -> None:
    """--port free on --host, before any model loads (Gradio's own message names GRADIO_SERVER_PORT)."""
    import socket

    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is free
        try:
            sock.bind((host if host != "0.0.0.0" else "", port))
        except OSError as err:
            raise ValueError(
                f"--port {port}: cannot listen on {host}:{port} ({err.strerror or err}); another program (another "
                "app?) uses it: pass another --port"
            ) from None


def build_app(ctx: AppContext, warning: str | None = None):
    """The Gradio Blocks; tabs exist only for what was loaded. `warning`: shown above everything (the app is
    open to the network without a login)."""
    # analytics_enabled=False: no usage statistics and no version check sent to gradio.app (offline sites).
    with gr.Blocks(title="PixCell", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        if warning:
            gr.Markdown(f"**Warning.** {warning}", elem_id="exposure-warning")
        gr.Markdown(header(ctx), elem_id="header")
        with gr.Tabs():
            with gr.Tab("Variants", id="variants"):
                variants_tab(ctx)
            if ctx.prior is not None:
                with gr.Tab("Reference-free", id="reference-free"):
                    reference_free_tab(ctx)
            if ctx.stainers:
                with gr.Tab("Virtual staining", id="staining"):
                    staining_tab(ctx)
    return blocks


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The server's settings before any model loads: logins, a free port, and a warning when open to the network.
    auth = read_auth(args)
    check_port(args.host, args.port)
    warning = exposure_warning(args.host, auth)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    ctx = load_context(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests
    blocks = build_app(ctx, warning)
    # One model run at a time (the events' concurrency_id "model"); other requests wait, up to --queue-size.
    blocks.queue(max_size=args.queue_size)
    print(f"PixCell app: http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    blocks.launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        show_error=True,  # an unexpected error shows its one-line message, never a traceback
        theme=gr.themes.Default(font=FONTS, font_mono=MONO),
        allowed_paths=[str(ctx.out_root)],
        quiet=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
