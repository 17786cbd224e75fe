"""Sampling at dataset scale: patches (PixCell-256/1024) and large regions, resumable, sharded, lossless.

    OUT/run.json        the settings that decide the pixels (model, sampler, steps, guidance, seed, dtype, ...);
                        a rerun with other settings into the same OUT is refused
    OUT/syn/<name>.png  generated images
    OUT/real/<name>.png the real image each one is conditioned on, when there is one (same name)
    OUT/manifest.jsonl  one row per generated image: files, source, seed, sampler, steps, guidance, model

Determinism and resume. Each image's seed comes from the base seed and its name (`name_seed`), its initial noise
(and the stochastic samplers' noise) from its own CPU generator; images are grouped into fixed batches by their
position in the (deterministic) list. A rerun skips batches whose images all exist and recomputes the others
identically, so after a kill the finished set is byte-identical to an uninterrupted run. Files are written to a
temporary name and renamed, the real image before the synthetic one, so an existing `syn/` file means its pair
is complete.

Several processes (`accelerate launch`, any number of GPUs or nodes) take disjoint batches (batch k goes to
process k mod N); since a batch is computed the same way wherever it runs, the outputs equal one process's. The
process that finishes last writes `manifest.jsonl`, in list order (no barrier at the end: see `finish_shard`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from ..encoders import UNIEncoder
    from ..model.pixcell_transformer import PixCellTransformer2DModel

from ..atomic import atomic_path
from ..encoders import decode_latents, to_uint8, vae_scale_factor
from ..geometry import tokens_side
from ..lock import FolderLock
from .checks import UnusableImage, check_images
from .conditions import ConditionSource, FolderSource, Loaded, SampleError, Spec, name_seed
from .dense_conditions import default_dense_stride, dense_layout, dense_window_conditions
from .large_image import (
    Chunker,
    decode_region,
    default_stride,
    default_vae_batch,
    default_window_batch,
    denoise_region,
    region_layout,
    window_layout,
)
from .limits import check_limits
from .pipeline import PixCellPipeline
from .samplers import SamplingOptions

log = logging.getLogger("pixcell.sample")
SUFFIX = {"png": ".png", "jpeg": ".jpg"}


#################################################################################
#                                   Settings                                    #
#################################################################################


@dataclass(frozen=True)
class SampleSettings:
    """What decides the pixels (recorded in run.json and each manifest row), and how the run is carried out."""

    sampling: SamplingOptions  # sampler, steps, guidance: resolved once (`PixCellPipeline.sampling_options`)
    seed: int = 0
    dtype: str = "fp32"
    format: str = "png"  # 'png' (lossless, default) or 'jpeg'
    jpeg_quality: int = 95
    # Carried out (not in run.json's checked keys):
    batch_size: int = 8
    vae_batch: int | None = None  # images per VAE decode call (default: batch_size)
    workers: int = 0  # DataLoader workers reading conditions and real images
    write_real: bool = True
    max_skips: int = 100  # stop when more conditions than this could not be read
    progress: bool = True

    def __post_init__(self) -> None:  # a 0 batch used to be replaced by the default without a word
        # (steps and guidance were checked where `sampling` was resolved: samplers.resolve_sampling)
        check_limits(
            {
                "batch_size": self.batch_size,
                "vae_batch": self.vae_batch,
                "workers": self.workers,
                "max_skips": self.max_skips,
                "jpeg_quality": self.jpeg_quality,
            }
        )


@dataclass
class RegionSettings:
    """Sliding-window options for large regions (see diffusion.sampling.large_image)."""

    stride: int | None = (
        None  # latent px between denoising windows; None: half a window (64 for PixCell-1024)
    )
    decode_stride: int | None = None  # latent px between decoded windows; None: half a window
    sigma: float = 0.3  # Gaussian blending window over [-1, 1]; the published script used 0.8
    window_batch: int | None = None  # windows per forward (x2 with guidance); None: all on GPU, 8 on CPU

    def __post_init__(self) -> None:
        check_limits(
            {
                "stride": self.stride,
                "decode_stride": self.decode_stride,
                "sigma": self.sigma,
                "window_batch": self.window_batch,
            }
        )


def model_reference(source: str | Path | torch.nn.Module) -> str:
    """What the manifest names as the model: a hub id, or `sha256:<16 hex>` of the local weight files."""
    if isinstance(source, torch.nn.Module):
        h = hashlib.sha256()
        for k, v in sorted(source.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
        return f"module-sha256:{h.hexdigest()[:16]}"
    path = Path(source)
    if not path.exists():
        return str(source)  # a hub id
    files = (
        [path]
        if path.is_file()
        else sorted(
            f
            for f in path.rglob("*")
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
        )
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return f"sha256:{h.hexdigest()[:16]}"


#################################################################################
#                           Output folder and bookkeeping                       #
#################################################################################


class OutputFolder:
    """OUT/syn, OUT/real, run.json and manifest.jsonl; images written atomically by a small thread pool."""

    def __init__(
        self,
        root: str | Path,
        fmt: str = "png",
        jpeg_quality: int = 95,
        writers: int = 2,
        syn_dir: str = "syn",
    ):
        if fmt not in SUFFIX:
            raise ValueError(f"`fmt` {fmt!r}: expected png or jpeg")
        self.root = Path(root)
        self.syn_dir = syn_dir  # "": synthetic images straight under OUT (tools/augment.py's class folders)
        self.fmt, self.quality = fmt, jpeg_quality
        self.suffix = SUFFIX[fmt]
        self.pool = ThreadPoolExecutor(max_workers=writers)
        self.pending: list[Future] = []

    def syn(self, name: str) -> Path:
        return self.root / self.syn_dir / f"{name}{self.suffix}"

    def real(self, name: str) -> Path:
        return self.root / "real" / f"{name}{self.suffix}"

    def done(self, spec: Spec) -> bool:
        return self.syn(spec.name).is_file()

    def check_run(self, info: dict, is_main: bool) -> None:
        """Refuse to mix outputs of different settings in one folder; the main process records the settings."""
        path = self.root / "run.json"
        if path.is_file():
            old = json.loads(path.read_text())
            diff = {k: (old.get(k), v) for k, v in info.items() if old.get(k) != v}
            if diff:
                detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
                raise ValueError(
                    f"{self.root}: holds images made with other settings ({detail}); use another output folder (`out_dir`)"
                )
        elif is_main:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(info, indent=1, sort_keys=True))

    def clean_temporaries(self) -> int:
        """Remove temporary files left by a killed run (main process only, before anyone writes)."""
        n = 0
        for sub in (self.syn_dir, "real"):
            for dirpath, _, files in os.walk(self.root / sub):
                for f in files:
                    if f.startswith(".") and f.endswith(".tmp"):
                        os.unlink(os.path.join(dirpath, f))
                        n += 1
        return n

    def _save(self, array: np.ndarray, path: Path) -> None:
        with atomic_path(path) as tmp:
            im = Image.fromarray(array)
            if self.fmt == "png":
                im.save(tmp, format="PNG")
            else:
                im.save(tmp, format="JPEG", quality=self.quality, subsampling=0)

    def write_pair(self, name: str, syn: np.ndarray, real: np.ndarray | None) -> None:
        """Queue the real image (if any) then the synthetic one: syn existing implies the pair is complete."""

        def job() -> None:
            if real is not None:
                self._save(real, self.real(name))
            self._save(syn, self.syn(name))

        self.pending.append(self.pool.submit(job))
        if len(self.pending) > 64:  # bound memory; surface write errors early
            self.flush(keep=32)

    def flush(self, keep: int = 0) -> None:
        while len(self.pending) > keep:
            self.pending.pop(0).result()

    def finish_shard(
        self, shards: Sequence[Sequence[str]], rank: int, rows: Callable[[], Iterator[dict]]
    ) -> bool:
        """Mark this process's shard (the names it was given) finished; the process that finds every shard
        finished writes the manifest. -> True if it wrote it.

        No collective wait at the end: after a resume one process may have hours more work than another, longer
        than a distributed barrier's timeout. A marker is named by its shard's content, so markers left by an
        earlier run (same settings: run.json) stay valid and those of another sharding are ignored.
        """
        ids = [hashlib.sha1("\n".join(names).encode()).hexdigest()[:20] for names in shards]
        marks = [self.root / ".shards" / f"{len(shards)}-{k}-{i}" for k, i in enumerate(ids)]
        with atomic_path(marks[rank]) as tmp:
            tmp.write_text("finished\n")
        if not all(m.is_file() for m in marks):
            return False
        self.write_manifest(rows())
        return True

    def write_manifest(self, rows: Iterator[dict]) -> Path:
        path = self.root / "manifest.jsonl"
        with atomic_path(path) as tmp, open(tmp, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        return path


class SkipCounter:
    """Log each unusable condition with a running count; raise past `limit` (never substitute silently)."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def __call__(self, message: str) -> None:
        self.count += 1
        log.warning("skipped (%d so far): %s", self.count, message)
        if self.count > self.limit:
            raise RuntimeError(
                f"more than {self.limit} conditions could not be used (last: {message}); fix the data or raise "
                "`max_skips`"
            )


def stop_or_skip(skip: SkipCounter) -> Callable[[UnusableImage], None]:
    """What a long run does with an unusable image (NaN/Inf or all one value): skip it, logged and counted, when its
    own condition is damaged; stop at once otherwise (the steps, guidance or model: every image would fail)."""

    def handle(err: UnusableImage) -> None:
        if not err.condition_fault:
            raise err
        skip(str(err))

    return handle


def _process_state(device: torch.device):
    """accelerate's process state (rank, world size, barrier); one process without `accelerate launch`.

    `cpu=True` on the CPU: PartialState (unlike Accelerator) ignores ACCELERATE_USE_CPU and would otherwise
    leave CPU processes started by `accelerate launch` unconnected.
    """
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


class _Loads(torch.utils.data.Dataset):
    def __init__(self, source: ConditionSource, specs: Sequence[Spec]):
        self.source, self.specs = source, specs

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> tuple[Spec, Loaded | None, str | None]:
        try:
            return self.specs[i], self.source.load(self.specs[i]), None
        except SampleError as err:
            return self.specs[i], None, str(err)


def _loader(
    source: ConditionSource, specs: Sequence[Spec], batches: Sequence[Sequence[int]], workers: int
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _Loads(source, specs), batch_sampler=batches, num_workers=workers, collate_fn=list
    )


#################################################################################
#                           Patches (PixCell-256 / 1024)                        #
#################################################################################


def as_images(arrays: Sequence[np.ndarray]) -> Tensor:
    """Real images (H, W, 3) uint8, all one size -> (B, 3, H, W) uint8, as `UNIEncoder.embed_grid` takes them."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def decode_batched(vae: AutoencoderKL, latents: Tensor, chunker: Chunker) -> Tensor:
    """(B, 16, h, w) model latents -> (B, 3, 8h, 8w) images in [0, 1], decoded `chunker.size` at a time."""
    out: list[Tensor] = []
    chunker.run(len(latents), lambda a, b: out.append(decode_latents(vae, latents[a:b])))
    return torch.cat(out)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> tuple[Tensor, list[torch.Generator]]:
    """(B, *shape) noise, row i from its own CPU generator seeded `seeds[i]` (any device, any batching)."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def _run_info(settings: SampleSettings, model_ref: str, vae_ref: str, extra: dict) -> dict:
    o = settings.sampling
    return {
        "model": model_ref,
        "vae": vae_ref,
        "sampler": o.sampler,
        "steps": o.steps,
        "guidance": o.guidance,
        "guidance_interval": list(o.guidance_interval) if o.guidance_interval else None,
        "seed": settings.seed,
        "dtype": settings.dtype,
        "format": settings.format if settings.format == "png" else f"jpeg q{settings.jpeg_quality}",
        **extra,
    }


@dataclass
class _Run:
    """What `_open_run` sets up for `sample_patches` and `sample_regions`, and `_close_run` finishes."""

    state: object  # accelerate PartialState
    out: OutputFolder
    manifest_meta: dict  # the settings every manifest row repeats
    lock: FolderLock | None  # the output folder's, on the main process


def _open_run(
    pipe: PixCellPipeline,
    out_dir: str | Path,
    settings: SampleSettings,
    model_ref: str,
    vae_ref: str,
    extra: dict,
    extra_in_manifest: bool = False,
    syn_dir: str = "syn",
) -> _Run:
    """The opening both runners share: process state, the output folder's run.json
    (refusing other settings), leftovers of a killed run removed, then every process waits for that."""
    state = _process_state(pipe._execution_device)
    # One run per output folder: the main process holds the lock until _close_run (or its own death).
    lock = FolderLock(out_dir, what="output folder").acquire() if state.is_main_process else None
    o = settings.sampling
    out = OutputFolder(out_dir, settings.format, settings.jpeg_quality, syn_dir=syn_dir)
    info = _run_info(settings, model_ref, vae_ref, extra)
    out.check_run(info, state.is_main_process)
    if state.is_main_process:
        out.clean_temporaries()
    state.wait_for_everyone()
    meta = {
        "sampler": o.sampler,
        "steps": o.steps,
        "guidance": o.guidance,
        "model": model_ref,
        "guidance_interval": info["guidance_interval"],
        "dtype": settings.dtype,
        **(extra if extra_in_manifest else {}),
    }
    return _Run(state, out, meta, lock)


def _close_run(run: _Run, specs: Sequence[Spec], shards: list[list[str]], summary: dict, seed: int) -> dict:
    """The ending both runners share: mark this process's shard finished; the last one writes the manifest."""
    rows = partial(_rows, run.out, specs, seed, run.manifest_meta)
    finished = run.out.finish_shard(shards, run.state.process_index, rows)
    if run.lock is not None:
        run.lock.release()
    if finished:
        summary["done"] = sum(run.out.done(s) for s in specs)
        log.info("%d/%d images in %s; manifest written", summary["done"], len(specs), run.out.root)
        if specs and not summary["done"]:  # every condition was skipped: a failed run, not an empty success
            raise RuntimeError(
                f"no image written to {run.out.root}: none of the {len(specs)} conditions could be used (each "
                "skip is logged above)"
            )
    return summary


@dataclass(frozen=True)
class MaskControl:
    """Cell-mask ControlNet inputs for `sample_patches`: one mask per image, `<mask_dir>/<name>.png` (or the
    name's last part), used with a `PixCellControlNetPipeline` at `scale`."""

    mask_dir: Path
    scale: float = 1.0
    controlnet_ref: str = ""

    def mask_for(self, name: str) -> Path:
        for cand in (self.mask_dir / f"{name}.png", self.mask_dir / f"{Path(name).name}.png"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"`mask_dir` {self.mask_dir}: no mask for {name} (expected {name}.png)")


def sample_patches(
    pipe: PixCellPipeline,
    source: ConditionSource,
    out_dir: str | Path,
    settings: SampleSettings,
    model_ref: str,
    vae_ref: str,
    uni: UNIEncoder | None = None,  # needed for FolderSource (tokens computed on the fly)
    control: MaskControl | None = None,  # cell masks, with a PixCellControlNetPipeline
    syn_dir: str = "syn",  # synthetic images go to OUT/<syn_dir>/<name>.png
) -> dict:
    """Generate one image per condition of `source` into `out_dir` (see the module docstring). -> run summary."""
    transformer = pipe.transformer
    tokens = transformer.config.caption_num_tokens
    if isinstance(source, FolderSource) and uni is None:
        raise ValueError("conditions from images need a UNI encoder (`uni`)")
    skip = SkipCounter(settings.max_skips)
    skipped: list[str] = []
    specs = source.specs(skipped)
    for message in skipped:
        skip(message)
    if not specs:
        raise ValueError(f"no conditions to sample from {source.describe()}")
    extra_info: dict = {"image_size": pipe.image_size, **source.run_info()}
    if control is not None:
        for spec in specs:  # every mask before any sampling: one line naming the first missing one
            control.mask_for(spec.name)
        extra_info |= {
            "controlnet": control.controlnet_ref,
            "controlnet_scale": control.scale,
            "masks": str(control.mask_dir),
        }
    size = transformer.config.sample_size
    run = _open_run(pipe, out_dir, settings, model_ref, vae_ref, extra_info, syn_dir=syn_dir)
    state, out = run.state, run.out

    bs = max(1, settings.batch_size)
    batches = [list(range(i, min(i + bs, len(specs)))) for i in range(0, len(specs), bs)]
    mine = [b for k, b in enumerate(batches) if k % state.num_processes == state.process_index]
    todo = [b for b in mine if not all(out.done(specs[i]) for i in b)]
    n_todo = sum(len(b) for b in todo)
    if state.is_main_process:
        log.info(
            "%d images from %s (%d batches of %d over %d process(es)); %d already done",
            len(specs),
            source.describe(),
            len(batches),
            bs,
            state.num_processes,
            sum(out.done(s) for s in specs),
        )
    log.info("process %d/%d: %d images to make", state.process_index, state.num_processes, n_todo)

    device = pipe._execution_device
    vae_batch = Chunker(bs if settings.vae_batch is None else settings.vae_batch, "VAE batch")
    bar = tqdm(
        total=n_todo, desc="sampling", unit="img", disable=not (settings.progress and state.is_main_process)
    )
    made = 0
    for batch in _loader(source, specs, todo, settings.workers):
        ok = []
        for spec, loaded, error in batch:
            if error is not None:
                skip(error)
            else:
                ok.append((spec, loaded))
        bar.update(len(batch) - len(ok))
        if not ok:
            continue
        if ok[0][1].tokens is not None:
            cond = torch.from_numpy(np.stack([ld.tokens.reshape(tokens, -1) for _, ld in ok]))
        else:
            cond = uni.embed_grid(as_images([ld.image for _, ld in ok]), tile=source.tile)
        seeds = [name_seed(settings.seed, spec.name) for spec, _ in ok]
        latents, gens = initial_noise(seeds, (transformer.config.in_channels, size, size))
        masks = {}
        if control is not None:
            masks = {
                "mask": [control.mask_for(spec.name) for spec, _ in ok],
                "controlnet_conditioning_scale": control.scale,
            }
        x = pipe(
            cond.to(device),
            **masks,
            options=settings.sampling,
            generator=gens,
            latents=latents.to(device),
            output_type="latent",
            progress=False,
            check_output=False,  # checked here, per image: a damaged condition skips its image only
        ).images
        names = [spec.name for spec, _ in ok]
        usable = check_images(x, names, "latents", cond, stop_or_skip(skip))
        images = decode_batched(pipe.vae, x, vae_batch)
        rows = [i for i, u in enumerate(usable) if u]
        decoded = check_images(
            images[rows], [names[i] for i in rows], "decoded image", cond[rows], stop_or_skip(skip)
        )
        for i, good, arr in zip(rows, decoded, to_uint8(images[rows])):
            spec, ld = ok[i]
            if good and not out.done(spec):  # (done: another part of a half-finished batch)
                real = ld.image if (settings.write_real and spec.has_real) else None
                out.write_pair(spec.name, arr, real)
                made += 1
        bar.update(len(ok))
    bar.close()
    out.flush()

    summary = {
        "images": len(specs),
        "made_here": made,
        "skipped_here": skip.count,
        "processes": state.num_processes,
    }
    shards = [
        [specs[i].name for b in batches[k :: state.num_processes] for i in b]
        for k in range(state.num_processes)
    ]
    return _close_run(run, specs, shards, summary, settings.seed)


def _rows(out: OutputFolder, specs: Sequence[Spec], seed: int, meta: dict) -> Iterator[dict]:
    for spec in specs:
        if not out.done(spec):
            continue
        real = out.real(spec.name)
        yield {
            "name": spec.name,
            "syn": out.syn(spec.name).relative_to(out.root).as_posix(),
            "real": real.relative_to(out.root).as_posix() if real.is_file() else None,
            "source": spec.source,
            "seed": name_seed(seed, spec.name),
            **meta,
        }


#################################################################################
#                                 Large regions                                 #
#################################################################################


def _region_latent(transformer: PixCellTransformer2DModel, spec: Spec) -> tuple[int, int]:
    """A region's latent (height, width): its token rows and columns times the latent px per token."""
    tile = transformer.config.sample_size // tokens_side(transformer.config.caption_num_tokens)
    return spec.rows * tile, spec.cols * tile


def sample_regions(
    pipe: PixCellPipeline,
    source: ConditionSource,  # a RegionSource
    out_dir: str | Path,
    settings: SampleSettings,
    region: RegionSettings,
    model_ref: str,
    vae_ref: str,
    uni: UNIEncoder | None = None,
) -> dict:
    """Generate each region of `source` by sliding-window denoising, then a blended tiled decode."""
    transformer = pipe.transformer
    tokens = transformer.config.caption_num_tokens
    window = transformer.config.sample_size
    decode_stride = region.decode_stride or window // 2
    specs = source.specs()

    # A reference image gives every window the embedding of its own crop (dense_conditions.py): any stride,
    # half a window by default. Stored token grids step on whole tokens (`default_stride`).
    def dense(spec: Spec) -> bool:
        return uni is not None and spec.source.get("type") == "image"

    stride = default_stride(transformer) if region.stride is None else region.stride
    dense_stride = default_dense_stride(window) if region.stride is None else region.stride
    for spec in specs:  # geometry errors now, not after hours of sampling
        try:
            if dense(spec):
                layout = dense_layout(*_region_latent(transformer, spec), window, dense_stride)
            else:
                layout = region_layout(transformer, (spec.rows, spec.cols), stride)
            window_layout(layout.height, layout.width, window, decode_stride, window, "decode stride")
        except ValueError as err:
            raise ValueError(f"region {spec.name}: {err}") from None
    extra = {"stride": stride, "decode_stride": decode_stride, "sigma": region.sigma, "window": window}
    if any(dense(spec) for spec in specs):
        extra["dense_stride"] = dense_stride
    run = _open_run(pipe, out_dir, settings, model_ref, vae_ref, extra, extra_in_manifest=True)
    state, out = run.state, run.out

    device = pipe._execution_device
    wb = Chunker(
        default_window_batch(device) if region.window_batch is None else region.window_batch, "window batch"
    )
    vb = Chunker(default_vae_batch(device) if settings.vae_batch is None else settings.vae_batch, "VAE batch")
    mine = [i for i in range(len(specs)) if i % state.num_processes == state.process_index]
    todo = [[i] for i in mine if not out.done(specs[i])]
    skip = SkipCounter(settings.max_skips)
    made = 0
    show = settings.progress and state.is_main_process
    for batch in tqdm(
        _loader(source, specs, todo, settings.workers), total=len(todo), desc="regions", disable=not show
    ):
        ((spec, loaded, error),) = batch
        if error is not None:
            skip(error)
            continue
        conds = None
        if loaded.tokens is not None:
            grid = torch.from_numpy(loaded.tokens)
        else:
            h, w = loaded.image.shape[:2]
            flat = uni.embed_grid(as_images([loaded.image]), tile=source.tile)[0]  # (gh*gw, C)
            grid = flat.view(h // source.tile, w // source.tile, -1)
            layout = dense_layout(*_region_latent(transformer, spec), window, dense_stride)
            conds = dense_window_conditions(
                as_images([loaded.image])[0],
                layout,
                tokens_side(tokens),
                uni.embed_grid,
                vae_scale_factor(pipe.vae),
            )
        gh, gw = grid.shape[:2]
        layout_tile = window // tokens_side(tokens)
        noise, gens = initial_noise(
            [name_seed(settings.seed, spec.name)],
            (transformer.config.in_channels, gh * layout_tile, gw * layout_tile),
        )
        latents = denoise_region(
            transformer,
            grid,
            stride=stride if conds is None else dense_stride,
            options=settings.sampling,
            latents=noise,
            generator=gens[0],
            window_batch=wb,
            progress=show,
            window_conds=conds,
        )
        condition = grid.reshape(1, gh * gw, -1)
        if not check_images(latents, [spec.name], "latents", condition, stop_or_skip(skip))[0]:
            continue
        image = decode_region(pipe.vae, latents, window, decode_stride, region.sigma, vb, progress=show)
        if not check_images(image, [spec.name], "decoded image", condition, stop_or_skip(skip))[0]:
            continue
        real = loaded.image if (settings.write_real and spec.has_real) else None
        out.write_pair(spec.name, to_uint8(image)[0], real)
        made += 1
    out.flush()
    summary = {"regions": len(specs), "made_here": made, "processes": state.num_processes}
    shards = [
        [specs[i].name for i in range(k, len(specs), state.num_processes)] for k in range(state.num_processes)
    ]
    return _close_run(run, specs, shards, summary, settings.seed)
