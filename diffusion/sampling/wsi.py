"""Whole slides: sliding-window generation of any size in bounded memory, resumable, shared by processes.

The update is `large_image.denoise_region`'s (MultiDiffusion with per-window UNI sub-grids, eps averaged where
windows overlap, one solver step on the whole latent), reorganised so that nothing the size of the slide is held
in memory (design point: 32,768^2 px at 20x, a 4096^2 x 16 latent):

    latents        two (H, W, 16) float32 `.npy` files on disk, x_s and x_{s+1} (`DiskArray`, read by rows)
    window row r   the windows whose origin is at latent row r * stride, all columns: their guided predictions
                   are summed into one (window, W, C_out) file `rows/s<step>_w<r>.npy`
    band b         latent rows [b * stride, (b + 1) * stride): its eps is the sum of the window rows covering it
                   divided by the coverage, and its own scheduler (a diffusers scheduler whose state holds band-
                   sized tensors, pickled in `sched/s<step>_b<b>.pt`) takes the solver step. Every sampler used
                   here updates each latent element from that element's history only (the multistep solvers keep
                   per-element model outputs), so stepping bands apart is the same as stepping the whole latent.
    decode row k   latent rows [k D - M, (k + 1) D + M) decoded in (D + 2M)^2 blocks (D = `decode_tile`, M =
                   `decode_margin`); blocks overlap by 2M on each side and are blended by linear ramps that sum to
                   one (a partition of unity, so no normalisation), each block's border (where the VAE saw zero
                   padding) fading out. Rows only one decode row covers go straight to the level-0 pixels; each
                   overlap strip is written by both neighbours to disk and joined by a `seam` task.
    pyramid        the level-0 pixels -> a pyramidal tiled BigTIFF (`pyramid.write_pyramid`).

Each of these is a task with the files it needs as dependencies; a task's outputs are written first (in place,
idempotent, or to a temporary name and renamed), then its marker `done/<task>`. So a killed run (kill -9
included) resumes by running the same command again: finished tasks are skipped, an interrupted one is redone
from inputs that nothing has overwritten (x_{s+1} is written only where x_s and the step-s scheduler states are
kept; a band's scheduler state goes to a new file per step). Several processes (one per GPU) started on the same
work folder share the tasks: each takes a task by `flock` on `locks/<task>.lock`, which the kernel releases when
its holder dies, and waits for tasks whose dependencies others are still computing.

Memory: a window row of latents and predictions (window x W x 48 floats) and a decode row of pixels ((D + 2M) 8
x 8W x 3 floats): it grows with the slide's width, not its area (a 32,768 px wide slide: ~250 MB of pixels with
the defaults), plus the models. Noise: each UNI tile (tile x tile latent px) has its own generator, seeded by
the run's seed and the tile's position, so the same seed gives the same noise in every tile of any crop or edit
of a grid, whatever the band layout. Stochastic samplers draw their per-step noise from a generator per
(step, band).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..encoders import decode_latents, encode_posterior, latents_to_model, vae_scale_factor
from ..geometry import tokens_side
from .conditions import name_seed
from .disk import DiskArray
from .editing import EDIT_SAMPLERS, noised, start_step
from .large_image import Chunker, WindowLayout, default_window_batch, window_conditions, window_layout
from .pyramid import write_pyramid
from .samplers import (
    guidance_in_model,
    guided_prediction,
    guides,
    make_scheduler,
    resolve_sampling,
    transformer_fn,
    wants_variance,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from ..model.pixcell_transformer import PixCellTransformer2DModel

log = logging.getLogger("pixcell.wsi")
# Samplers whose model input is the latent itself (scale_model_input is the identity, init_noise_sigma 1), so a
# band can be stepped from the stored latent alone. Euler-ancestral scales its input by the step's sigma.
WSI_SAMPLERS = EDIT_SAMPLERS


#################################################################################
#                                   Settings                                    #
#################################################################################


@dataclass(frozen=True)
class WSISettings:
    """What decides the pixels of a whole-slide run (recorded in plan.json; a rerun must match), then how."""

    sampler: str = "dpm-solver"
    steps: int | None = None  # None: the sampler's default (20 for DPM-Solver++)
    guidance: float | None = None  # None: the published default for the model's token count
    guidance_interval: tuple[float, float] | None = None
    seed: int = 0
    stride: int | None = None  # latent px between windows; None: half a window (64 for PixCell-1024)
    strength: float = 1.0  # img2img / inpainting (SDEdit): 1 starts from pure noise, 0 keeps the image
    decode_tile: int = 64  # D: latent px per decoded block (512 px)
    decode_margin: int = 8  # M: latent px each block reaches into its neighbours (blended over 2M)
    mpp: float = 0.5  # micrometres per pixel written in the TIFF (20x)
    magnification: float = 20.0
    compression: str = "jpeg"  # TIFF tiles: 'jpeg' (quality 90) or 'deflate' (lossless)
    # Carried out (not in the plan's checked keys):
    window_batch: int | None = None  # windows per forward (x2 with guidance); None: all on GPU, 8 on CPU
    vae_batch: int = 4  # decode blocks per VAE call
    progress: bool = True
    poll_seconds: float = 0.2  # how often a process waiting on another's task looks again

    def plan_keys(self) -> dict:
        keys = asdict(self)
        for carried in ("window_batch", "vae_batch", "progress", "poll_seconds"):
            keys.pop(carried)
        return keys


@dataclass
class WSIInputs:
    """What the run is conditioned on, already on disk in the work folder (see `prepare_work`)."""

    grid: DiskArray  # (Gh, Gw, C) float32 UNI tokens
    known: DiskArray | None = None  # (H, W, 16) model-space latents of an init image (img2img / inpainting)
    mask: DiskArray | None = None  # (H, W, 1) float32 in [0, 1]: 1 where generated (inpainting), None: all


#################################################################################
#                               Tasks and claims                                #
#################################################################################


@dataclass
class Task:
    name: str
    deps: list[str]
    run: Callable[[], None]


@dataclass
class TaskRunner:
    """Runs tasks in order as their dependencies finish; shares them with other processes on the same folder."""

    work: Path
    poll_seconds: float = 0.2
    done: set[str] = field(default_factory=set)

    def is_done(self, name: str) -> bool:
        if name not in self.done and (self.work / "done" / name).exists():
            self.done.add(name)
        return name in self.done

    def _claim(self, name: str):
        path = self.work / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        return fh

    def run(self, tasks: Sequence[Task], bar: tqdm | None = None) -> int:
        """Run every task not done yet; -> the number this process ran. Returns when all are done."""
        (self.work / "done").mkdir(parents=True, exist_ok=True)
        pending = [t for t in tasks if not self.is_done(t.name)]
        if bar is not None:
            bar.update(len(tasks) - len(pending))
        ran = 0
        while pending:
            progressed = False
            for task in pending:
                if self.is_done(task.name) or not all(self.is_done(d) for d in task.deps):
                    continue
                fh = self._claim(task.name)
                if fh is None:  # another process is on it
                    continue
                try:
                    if not (self.work / "done" / task.name).exists():
                        task.run()
                        (self.work / "done" / task.name).touch()
                        ran += 1
                    self.done.add(task.name)
                finally:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                    fh.close()
                progressed = True
                break  # look again from the first pending task: earlier bands first
            before = len(pending)
            pending = [t for t in pending if not self.is_done(t.name)]
            if bar is not None:
                bar.update(before - len(pending))
            if not progressed and pending:
                time.sleep(self.poll_seconds)
        return ran


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


#################################################################################
#                                 Band geometry                                 #
#################################################################################


def _covering(start: int, stop: int, origins: Sequence[int], size: int) -> list[int]:
    """Indices of the intervals [o, o + size) that meet [start, stop)."""
    return [i for i, o in enumerate(origins) if o < stop and o + size > start]


def _coverage_1d(length: int, origins: Sequence[int], size: int) -> np.ndarray:
    count = np.zeros(length, np.float32)
    for o in origins:
        count[o : o + size] += 1
    return count


def ramp_weights(
    length: int, starts: Sequence[int], tile: int, margin: int
) -> list[tuple[int, int, np.ndarray]]:
    """Blocks [k tile - margin, (k + 1) tile + margin) over [0, length), clipped, with weights that sum to one.

    -> (start, stop, weights) per block: 1 inside, a linear ramp over the 2 * margin rows shared with a
    neighbour (pixel-centred, so the two ramps add to exactly one), no ramp at the region's border."""
    blocks = []
    n = len(starts)
    for k, s in enumerate(starts):
        a, b = max(0, s - margin), min(length, s + tile + margin)
        y = np.arange(a, b, dtype=np.float64) + 0.5
        w = np.ones(b - a)
        if k > 0 and margin > 0:
            w = np.minimum(w, np.clip((y - (s - margin)) / (2 * margin), 0, 1))
        if k < n - 1 and margin > 0:
            w = np.minimum(w, np.clip((s + tile + margin - y) / (2 * margin), 0, 1))
        blocks.append((a, b, w.astype(np.float32)))
    return blocks


#################################################################################
#                                    Engine                                     #
#################################################################################


class WSIRun:
    """One whole-slide run in a work folder: denoise by window rows and bands, decode by rows, write the pyramid.

    >>> run = WSIRun(work, transformer, vae, inputs, settings)
    >>> run.run(out / "slide.tif")        # again after a kill: resumes; in N processes at once: shared
    """

    def __init__(
        self,
        work: str | Path,  # the run's folder (OUT/work): latents, step files, markers
        transformer: PixCellTransformer2DModel,
        vae: AutoencoderKL,
        inputs: WSIInputs,
        settings: WSISettings,
    ):
        self.work = Path(work)
        self.transformer, self.vae, self.inputs, self.settings = transformer, vae, inputs, settings
        self.device = next(transformer.parameters()).device
        cfg = transformer.config
        if settings.sampler not in WSI_SAMPLERS:
            raise ValueError(
                f"sampler {settings.sampler!r} cannot step a slide band by band; use one of {', '.join(WSI_SAMPLERS)}"
            )
        self.m = tokens_side(cfg.caption_num_tokens)
        self.window = cfg.sample_size
        self.tile = self.window // self.m
        gh, gw, channels = inputs.grid.shape
        if channels != cfg.caption_channels:
            raise ValueError(
                f"token grid: {channels} channels per token, the model takes {cfg.caption_channels}"
            )
        self.height, self.width = gh * self.tile, gw * self.tile
        stride = settings.stride if settings.stride is not None else max(self.tile, self.window // 2)
        self.layout: WindowLayout = window_layout(self.height, self.width, self.window, stride, self.m)
        self.stride = stride
        self.origins = list(range(0, self.height - self.window + 1, stride))  # window rows
        self.bands = [(y, min(self.height, y + stride)) for y in range(0, self.height, stride)]
        self.row_cover = _coverage_1d(self.height, self.origins, self.window)
        self.col_cover = _coverage_1d(self.width, range(0, self.width - self.window + 1, stride), self.window)
        sampling = resolve_sampling(
            settings.sampler, settings.steps, settings.guidance, cfg.caption_num_tokens
        )
        self.steps, self.guidance = sampling.steps, sampling.guidance
        self.start = start_step(self.steps, settings.strength)  # the first step run (SDEdit)
        if (settings.strength < 1 or inputs.mask is not None) and inputs.known is None:
            raise ValueError("`strength` below 1 and a mask need an init image to start from")
        probe = make_scheduler(settings.sampler)
        self.variance = wants_variance(probe)
        self.channels = cfg.in_channels
        self.out_channels = 2 * self.channels if self.variance else self.channels
        probe.set_timesteps(self.steps)
        self.timesteps = probe.timesteps.clone()
        self.factor = vae_scale_factor(vae)
        for name, value in (("decode_tile", settings.decode_tile), ("decode_margin", settings.decode_margin)):
            if value < 0 or (name == "decode_tile" and value < 1):
                raise ValueError(f"`{name}` {value}: expected a positive number of latent px")
        self.x = [
            DiskArray(self.work / f"x{i}.npy", (self.height, self.width, self.channels)) for i in (0, 1)
        ]
        self.pixels = DiskArray(
            self.work / "level0.npy", (self.height * self.factor, self.width * self.factor, 3), "uint8"
        )
        student = guidance_in_model(transformer)
        self.uncond = transformer.null_condition(1)[0] if guides(self.guidance) and not student else None
        self.model_fn = transformer_fn(transformer, self.guidance if student else None)
        batch = (
            settings.window_batch if settings.window_batch is not None else default_window_batch(self.device)
        )
        self.chunker = Chunker(batch, "window batch")

    # ------------------------------------------------------------------ per-band schedulers

    def _fresh_scheduler(self):
        sched = make_scheduler(self.settings.sampler)
        sched.set_timesteps(self.steps, device=self.device)
        if self.start and hasattr(sched, "set_begin_index"):
            sched.set_begin_index(self.start)
        return sched

    def _sched_path(self, step: int, band: int) -> Path:
        return self.work / "sched" / f"s{step}_b{band}.pt"

    def _noise(self, y0: int, y1: int) -> Tensor:
        """(y1 - y0, W, 16) noise of latent rows y0..y1 (whole tiles): each tile from its own seeded generator."""
        t = self.tile
        out = torch.empty(y1 - y0, self.width, self.channels)
        for ty in range(y0 // t, y1 // t):
            for tx in range(self.width // t):
                g = torch.Generator().manual_seed(name_seed(self.settings.seed, f"noise:{ty}:{tx}"))
                out[ty * t - y0 : (ty + 1) * t - y0, tx * t : (tx + 1) * t] = torch.randn(
                    self.channels, t, t, generator=g
                ).permute(1, 2, 0)
        return out

    def _noised_known(self, y0: int, y1: int, index: int) -> Tensor:
        """The init image's latents of rows y0..y1 noised to the level of step `index` (the tile noise of the
        seed); past the last step, the latents themselves."""
        known = torch.from_numpy(self.inputs.known.read(y0, y1))
        t = self.timesteps[index] if index < self.steps else None
        return noised(known, self._noise(y0, y1), t).float()

    # ------------------------------------------------------------------ tasks

    @torch.no_grad()
    def _init(self) -> None:
        for y0, y1 in self.bands:
            if self.inputs.known is not None and self.start > 0:
                x = self._noised_known(y0, y1, self.start)
            else:
                x = self._noise(y0, y1)
            self.x[self.start % 2].write(y0, x.numpy())

    @torch.no_grad()
    def _window_row(self, step: int, r: int) -> None:
        y, w = self.origins[r], self.window
        x = torch.from_numpy(self.x[step % 2].read(y, y + w)).permute(2, 0, 1)[None].to(self.device)
        grid = torch.from_numpy(self.inputs.grid.read(y // self.tile, y // self.tile + self.m))
        row = WindowLayout(w, self.width, w, self.layout.stride, self.tile)
        conds = window_conditions(grid, row).to(self.device)
        xs_at = [u for _, u in row.positions]
        n = len(xs_at)
        uncond = self.uncond.unsqueeze(0).expand(n, -1, -1) if self.uncond is not None else None
        total = torch.zeros(1, self.out_channels, w, self.width, device=self.device)
        t = self.timesteps[step].to(self.device)

        def chunk(a: int, b: int) -> None:
            xs = torch.cat([x[:, :, :, u : u + w] for u in xs_at[a:b]])  # (n, C, w, w)
            unc = uncond[a:b] if uncond is not None else None
            out = guided_prediction(
                self.model_fn, xs, t, conds[a:b], unc, self.guidance, self.settings.guidance_interval
            )
            for i, u in enumerate(xs_at[a:b]):
                total[0, :, :, u : u + w] += out[i, : self.out_channels]

        self.chunker.run(n, chunk)
        _save_npy(self.work / "rows" / f"s{step}_w{r}.npy", total[0].permute(1, 2, 0).cpu().numpy())

    @torch.no_grad()
    def _band(self, step: int, b: int) -> None:
        y0, y1 = self.bands[b]
        eps = np.zeros((y1 - y0, self.width, self.out_channels), np.float32)
        for r in _covering(y0, y1, self.origins, self.window):
            o = self.origins[r]
            part = np.load(self.work / "rows" / f"s{step}_w{r}.npy", mmap_mode="r")
            a, c = max(y0, o), min(y1, o + self.window)
            eps[a - y0 : c - y0] += part[a - o : c - o]
        eps /= (self.row_cover[y0:y1, None] * self.col_cover[None, :])[..., None]
        prev = self._sched_path(step - 1, b)
        sched = torch.load(prev, weights_only=False) if step > self.start else self._fresh_scheduler()
        x = torch.from_numpy(self.x[step % 2].read(y0, y1)).permute(2, 0, 1)[None].to(self.device)
        e = torch.from_numpy(eps).permute(2, 0, 1)[None].to(self.device)
        g = torch.Generator(self.device).manual_seed(name_seed(self.settings.seed, f"step:{step}:{b}"))
        x = sched.step(e, self.timesteps[step].to(self.device), x, generator=g, return_dict=False)[0]
        x = x[0].permute(1, 2, 0).float().cpu()
        if (
            self.inputs.mask is not None
        ):  # inpainting: outside the mask, the init image noised to the next step
            keep = torch.from_numpy(self.inputs.mask.read(y0, y1))
            x = keep * x + (1 - keep) * self._noised_known(y0, y1, step + 1)
        self.x[(step + 1) % 2].write(y0, x.numpy())
        path = self._sched_path(step, b)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(sched, tmp)

    def _cleanup_step(self, step: int) -> None:
        """Once every band has taken step s, the step's window rows and the step s - 1 states are not needed
        (a band redone after a kill reads them, so they go only now)."""
        for r in range(len(self.origins)):
            (self.work / "rows" / f"s{step}_w{r}.npy").unlink(missing_ok=True)
        for b in range(len(self.bands)):
            self._sched_path(step - 1, b).unlink(missing_ok=True)

    def _decode_starts(self) -> list[int]:
        return list(range(0, self.height, self.settings.decode_tile))

    @torch.no_grad()
    def _decode_row(self, k: int) -> None:
        """Decode latent rows of block row k in blocks; write the rows it alone covers, and its overlap strips."""
        s = self.settings
        f, final = self.factor, self.x[self.steps % 2]
        rows = ramp_weights(self.height, self._decode_starts(), s.decode_tile, s.decode_margin)
        cols = ramp_weights(
            self.width, list(range(0, self.width, s.decode_tile)), s.decode_tile, s.decode_margin
        )
        a, b, wy = rows[k]
        latent = torch.from_numpy(final.read(a, b)).permute(2, 0, 1)[None]  # (1, 16, b - a, W)
        image = np.zeros(((b - a) * f, self.width * f, 3), np.float32)
        wy_px = np.repeat(wy, f)[:, None, None]
        vae_dev = next(self.vae.parameters()).device
        for i in range(0, len(cols), s.vae_batch):
            group = cols[i : i + s.vae_batch]
            # Blocks of one row are the same height; the last column block may be narrower: decode apart.
            for same in _same_width(group):
                z = torch.cat([latent[..., c0:c1] for c0, c1, _ in same]).to(vae_dev)
                decoded = decode_latents(self.vae, z).permute(0, 2, 3, 1).cpu().numpy()  # (n, h, w, 3)
                for (c0, c1, wx), img in zip(same, decoded):
                    image[:, c0 * f : c1 * f] += img * (wy_px * np.repeat(wx, f)[None, :, None])
        top = k * s.decode_tile + s.decode_margin if k > 0 else a  # rows shared with the row above end here
        low = (k + 1) * s.decode_tile - s.decode_margin if k < len(rows) - 1 else b  # shared below from here
        top, low = min(max(top, a), b), max(min(low, b), a)
        if top > a:
            _save_npy(self.work / "strips" / f"k{k}_top.npy", image[: (top - a) * f])
        if low < b:
            _save_npy(self.work / "strips" / f"k{k}_bottom.npy", image[(low - a) * f :])
        if low > top:
            self.pixels.write(top * f, _to_uint8(image[(top - a) * f : (low - a) * f]))

    def _seam(self, k: int) -> None:
        """The rows shared by decode rows k - 1 and k: their two weighted halves added (the weights sum to one)."""
        strips = self.work / "strips"
        upper, lower = np.load(strips / f"k{k - 1}_bottom.npy"), np.load(strips / f"k{k}_top.npy")
        start = k * self.settings.decode_tile - self.settings.decode_margin
        self.pixels.write(max(0, start) * self.factor, _to_uint8(upper + lower))
        (strips / f"k{k - 1}_bottom.npy").unlink(missing_ok=True)
        (strips / f"k{k}_top.npy").unlink(missing_ok=True)

    # ------------------------------------------------------------------ the run

    def tasks(self, out: Path, note: str = "") -> list[Task]:
        tasks = [Task("init", [], self._init)]
        last = {b: "init" for b in range(len(self.bands))}
        for step in range(self.start, self.steps):
            for r, o in enumerate(self.origins):
                deps = sorted({last[b] for b in self._bands_meeting(o, o + self.window)})
                tasks.append(Task(f"s{step}_w{r}", deps, _bind(self._window_row, step, r)))
            for b, (y0, y1) in enumerate(self.bands):
                deps = [f"s{step}_w{r}" for r in _covering(y0, y1, self.origins, self.window)]
                tasks.append(Task(f"s{step}_b{b}", deps, _bind(self._band, step, b)))
            for b in range(len(self.bands)):
                last[b] = f"s{step}_b{b}"
            tasks.append(Task(f"s{step}_clean", [last[b] for b in last], _bind(self._cleanup_step, step)))
        s = self.settings
        starts = self._decode_starts()
        for k, (a, b, _) in enumerate(ramp_weights(self.height, starts, s.decode_tile, s.decode_margin)):
            deps = sorted({last[i] for i in self._bands_meeting(a, b)})
            tasks.append(Task(f"decode{k}", deps, _bind(self._decode_row, k)))
        for k in range(1, len(starts)):
            tasks.append(Task(f"seam{k}", [f"decode{k - 1}", f"decode{k}"], _bind(self._seam, k)))
        pyramid_deps = [t.name for t in tasks if t.name.startswith(("decode", "seam"))]
        tasks.append(Task("pyramid", pyramid_deps, _bind(self._pyramid, out, note)))
        return tasks

    def _bands_meeting(self, start: int, stop: int) -> list[int]:
        return [b for b, (y0, y1) in enumerate(self.bands) if y0 < stop and y1 > start]

    def _pyramid(self, out: Path, note: str) -> None:
        s = self.settings
        write_pyramid(
            self.pixels, out, s.mpp, s.magnification, s.compression, note=note, work=self.work / "levels"
        )

    def run(self, out: str | Path, note: str = "") -> int:
        """Run (or resume, or join) the whole slide; writes `out` (.tif) -> the number of tasks this process ran."""
        out = Path(out)
        tasks = self.tasks(out, note)
        bar = tqdm(total=len(tasks), desc="whole slide", unit="task", disable=not self.settings.progress)
        runner = TaskRunner(self.work, self.settings.poll_seconds)
        ran = runner.run(tasks, bar)
        bar.close()
        return ran

    def clear_work(self) -> None:
        """Remove the bulky files of a finished run (latents, pixels, step states); the plan, the grid and the
        done markers stay, so the same command run again finds the slide finished."""
        import shutil

        if not (self.work / "done" / "pyramid").exists():
            return
        for name in ("x0.npy", "x1.npy", "level0.npy", "known.npy", "mask.npy"):
            (self.work / name).unlink(missing_ok=True)
        for folder in ("rows", "sched", "strips", "levels", "locks"):
            shutil.rmtree(self.work / folder, ignore_errors=True)

    @property
    def windows_per_step(self) -> int:
        return len(self.layout.positions)


def _same_width(blocks: list[tuple[int, int, np.ndarray]]) -> list[list[tuple[int, int, np.ndarray]]]:
    groups: dict[int, list] = {}
    for blk in blocks:
        groups.setdefault(blk[1] - blk[0], []).append(blk)
    return list(groups.values())


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _bind(fn: Callable, *args) -> Callable[[], None]:
    return lambda: fn(*args)


#################################################################################
#                        Work folder: plan, grid, init image                    #
#################################################################################


def grid_digest(grid: DiskArray, rows: int = 64) -> str:
    """sha256 of a token grid's bytes, read `rows` token rows at a time."""
    h = hashlib.sha256(str(grid.shape).encode())
    for y in range(0, grid.shape[0], rows):
        h.update(grid.read(y, y + rows).tobytes())
    return h.hexdigest()[:16]


def prepare_work(
    work: str | Path,
    grid: np.ndarray | DiskArray,  # (Gh, Gw, C) tokens, or a DiskArray already in place
    plan: dict,  # what decides the pixels: settings.plan_keys() + the model and VAE references
    known: np.ndarray | None = None,  # (H, W, 16) model-space init latents (img2img / inpainting)
    mask: np.ndarray | None = None,  # (H, W) or (H, W, 1) in [0, 1], 1 where generated
) -> WSIInputs:
    """Set up (or reopen) a work folder: its grid, init latents and mask on disk, and plan.json.

    A work folder whose plan.json differs from `plan` (another grid, seed, model, steps, ...) is an error naming
    the first differing key: resuming it would mix two runs."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "setup.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # concurrent starters: one sets up, the others reopen
        plan_path = work / "plan.json"
        arrays: dict[str, np.ndarray | DiskArray | None] = {"grid": grid, "known": known, "mask": mask}
        if mask is not None and np.asarray(mask).ndim == 2:
            arrays["mask"] = np.asarray(mask)[..., None]
        if plan_path.exists():
            saved = json.loads(plan_path.read_text())
            digests = {k: saved.get(f"{k}_sha256") for k in arrays}
        else:
            saved, digests = None, {}
        opened: dict[str, DiskArray | None] = {}
        new_plan = dict(plan)
        for key, value in arrays.items():
            if value is None:
                opened[key] = None
                new_plan[f"{key}_sha256"] = None
                continue
            if isinstance(value, DiskArray):
                disk = value
            else:
                value = np.asarray(value, np.float32)
                disk = DiskArray(work / f"{key}.npy", value.shape, "float32")
                if saved is None or digests.get(key) is None:
                    disk.write(0, value)
                elif not np.array_equal(disk.read(0, disk.shape[0]), value):
                    disk.write(0, value)  # differs: the plan check below names it
            opened[key] = disk
            new_plan[f"{key}_sha256"] = grid_digest(disk)
        if saved is not None:
            for key in sorted(set(saved) | set(new_plan)):
                if saved.get(key) != new_plan.get(key):
                    raise ValueError(
                        f"{work}: holds a run with another {key} ({saved.get(key)!r}, now {new_plan.get(key)!r}); "
                        "rerun with the same settings to resume, or use another output folder"
                    )
        else:
            with atomic_path(plan_path) as tmp:
                tmp.write_text(json.dumps(new_plan, indent=1, sort_keys=True))
    return WSIInputs(opened["grid"], opened["known"], opened["mask"])


@torch.no_grad()
def encode_region(vae: AutoencoderKL, image: np.ndarray, tile: int = 64, margin: int = 8) -> np.ndarray:
    """(H, W, 3) uint8 image -> (H/8, W/8, 16) model-space latents (posterior mean), encoded in (tile + 2 margin)
    latent px blocks whose centres are kept (the encoder is local: a margin hides the block borders)."""
    f = vae_scale_factor(vae)
    h, w = image.shape[0] // f, image.shape[1] // f
    out = np.zeros((h, w, 16), np.float32)
    dev = next(vae.parameters()).device
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            a, b = max(0, y - margin), min(h, y + tile + margin)
            c, d = max(0, x - margin), min(w, x + tile + margin)
            px = torch.from_numpy(np.ascontiguousarray(image[a * f : b * f, c * f : d * f])).float() / 255
            mean, _ = encode_posterior(vae, px.permute(2, 0, 1)[None].to(dev))
            z = latents_to_model(mean, vae)[0].permute(1, 2, 0).cpu().numpy()
            yy, xx = min(h, y + tile), min(w, x + tile)
            out[y:yy, x:xx] = z[y - a : yy - a, x - c : xx - c]
    return out


def feathered_mask(mask: np.ndarray, factor: int, feather: int) -> np.ndarray:
    """A pixel mask (H, W) in {0, 1} -> its latent mask (H/f, W/f): 1 where any pixel is masked, dilated by
    `feather` latent px and ramped linearly to 0 over them (so the regenerated area blends into the kept one)."""
    from scipy.ndimage import distance_transform_edt

    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    lat = mask[: h * factor, : w * factor].reshape(h, factor, w, factor).max(axis=(1, 3)) > 0
    if feather <= 0:
        return lat.astype(np.float32)
    dist = distance_transform_edt(~lat)
    return np.clip(1 - dist / (feather + 1), 0, 1).astype(np.float32)
