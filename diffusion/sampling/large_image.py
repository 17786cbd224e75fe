"""Large regions (4096 x 4096 px and any multiple of the model's window) by sliding-window denoising.

The algorithm (PixCell paper, Sec. "Large image generation"; the published `sample_4k.py`; it is MultiDiffusion,
Bar-Tal et al., ICML 2023, Eq. 3-5, with per-window conditions). The region's latent x_t (1, 16, H, W) is covered
by windows W_i of the model's size (128 x 128 latent px = 1024 px for PixCell-1024) at a stride s of 32, 64 or
128 latent px (any multiple of one UNI tile, 256 px = 32 latent px, that divides H - 128 and W - 128). Window i
is conditioned on its own m x m sub-grid c_i of the region's UNI embedding grid (4 x 4 tokens for PixCell-1024),
the tiles that the window covers. At every step t:

    eps_i    = eps_u(x_t[W_i]) + w (eps_c(x_t[W_i], c_i) - eps_u(x_t[W_i]))        (`guided_prediction`)
    eps(x_t) = sum_i P_i^T eps_i / sum_i P_i^T 1                                     (average where windows overlap)
    x_{t-1}  = scheduler.step(eps(x_t), t, x_t)                                      (one solver step, whole latent)

where P_i crops window i and P_i^T pads it back. The published script averages the x0 predictions of the
windows and takes a DDIM step; x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) is affine in eps with the same
coefficients everywhere, so averaging x0 and averaging eps give the same update, and the eps form lets any
diffusers solver (DPM-Solver++ by default) take the step. With the ancestral DDPM sampler the learned-variance
channels are averaged the same way. Guidance is the one convention of `diffusion.sampling.samplers` (the published
script used (w+1) eps_c - w eps_u: its w = 2 is w = 3 here).

Speed: the original ran one window per forward, conditional and unconditional separately (2 x 49 forwards per
step at stride 64 for 4096 px). Here all windows of a step, conditional and unconditional, go through the model
in chunks of `window_batch` windows (2 x window_batch rows per forward); the chunk halves itself on CUDA
out-of-memory. `diffusion.standins.reference_eps_fn` keeps the one-window-at-a-time loop, for tests and
benchmarks.

Decoding: the VAE decodes overlapping windows of the final latent (batched; by default at half a window's
stride), each weighted by a Gaussian window exp(-(u^2 + v^2) / sigma^2) over u, v in [-1, 1], and the weighted
images are summed and divided by the summed weights, so window borders (where a decode sees zero padding) fade
out. The published script used sigma = 0.8, which still gives a window's border 21% of its centre's weight; the
tools default to 0.3 (~1e-5 at the border), which on a VAE with strong border artifacts cut the seam amplitude
10-fold in our test (tests/diffusion/sampling/test_large_image.py); any sigma > 0 gives the same image where windows agree.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from ..model.pixcell_transformer import PixCellTransformer2DModel

from ..encoders import decode_latents, vae_scale_factor
from ..geometry import tokens_side
from .samplers import (
    SamplingOptions,
    denoise,
    guidance_in_model,
    guided_prediction,
    guides,
    make_scheduler,
    resolve_sampling,
    transformer_fn,
)

log = logging.getLogger("pixcell.large_image")
STRIDES = (32, 64, 128)  # the published choices, latent px (256 / 512 / 1024 px)


#################################################################################
#                                 Window layout                                 #
#################################################################################


@dataclass(frozen=True)
class WindowLayout:
    """Windows of `window` latent px at `stride` over a (height, width) latent, one UNI token per `tile` px."""

    height: int  # region latent size
    width: int
    window: int  # model's latent size (sample_size): 128 for PixCell-1024
    stride: int  # latent px between window origins
    tile: int  # latent px per UNI token: window // tokens per side (32 for PixCell-1024)

    @property
    def positions(self) -> list[tuple[int, int]]:
        """Window origins (y, x) in latent px, row-major."""
        ys = range(0, self.height - self.window + 1, self.stride)
        xs = range(0, self.width - self.window + 1, self.stride)
        return [(y, x) for y in ys for x in xs]

    @property
    def tokens_side(self) -> int:
        return self.window // self.tile

    def coverage(self, device: torch.device | str = "cpu") -> Tensor:
        """(H, W) number of windows covering each latent pixel (>= 1 everywhere)."""
        count = torch.zeros(self.height, self.width, device=device)
        for y, x in self.positions:
            count[y : y + self.window, x : x + self.window] += 1
        return count


def window_layout(
    height: int, width: int, window: int, stride: int, tokens_side: int, what: str = "stride"
) -> WindowLayout:
    """Validated layout: stride a multiple of one token tile that steps exactly from edge to edge."""
    if window % tokens_side:
        raise ValueError(f"window {window} latent px is not divisible by {tokens_side} tokens per side")
    tile = window // tokens_side
    for name, size in (("height", height), ("width", width)):
        if size < window or size % tile:
            raise ValueError(
                f"region {name} {size} latent px: expected a multiple of {tile} px and at least one window ({window})"
            )
    if stride < 1 or stride % tile or stride > window:
        raise ValueError(
            f"{what} {stride} latent px: expected a multiple of {tile} (one UNI tile) and at most {window} "
            f"(the window); e.g. {', '.join(str(s) for s in STRIDES if s % tile == 0 and s <= window)}"
        )
    if (height - window) % stride or (width - window) % stride:
        raise ValueError(
            f"{what} {stride} latent px does not step from edge to edge of a {height}x{width} latent with "
            f"{window} px windows; use a divisor of {math.gcd(height - window, width - window) or window}"
        )
    return WindowLayout(height, width, window, stride, tile)


def dense_layout(height: int, width: int, window: int, stride: int) -> WindowLayout:
    """Windows at any `stride` (latent px) that steps exactly from edge to edge, for per-window conditions that do
    not come from a token grid (dense_conditions.py)."""
    # tokens_side=window: a "tile" of one latent px, so any stride is on the grid (as for the blended decode)
    return window_layout(height, width, window, stride, tokens_side=window, what="stride")


def default_dense_stride(window: int) -> int:
    """Half a window (16 latent px = 128 px for a 256 px model): every pixel is covered by up to 4 windows."""
    return max(1, window // 2)


def window_conditions(grid: Tensor, layout: WindowLayout) -> Tensor:
    """(Gh, Gw, C) region token grid -> (N_windows, m*m, C): each window's own sub-grid, row-major."""
    m, t = layout.tokens_side, layout.tile
    if grid.shape[0] * t != layout.height or grid.shape[1] * t != layout.width:
        raise ValueError(
            f"token grid {tuple(grid.shape[:2])} does not cover a {layout.height}x{layout.width} latent "
            f"({t} latent px per token)"
        )
    # unfold: (C, Gh, Gw) -> all m x m patches at a stride of stride/t tokens.
    s = layout.stride // t
    patches = grid.permute(2, 0, 1).unfold(1, m, s).unfold(2, m, s)  # (C, ny, nx, m, m)
    c = grid.shape[2]
    return patches.permute(1, 2, 3, 4, 0).reshape(-1, m * m, c)  # (N, m*m, C), windows row-major


#################################################################################
#                         Chunked forwards with OOM back-off                    #
#################################################################################


class Chunker:
    """Runs `fn(start, stop)` over range(n) in chunks; on CUDA out-of-memory the chunk halves and is kept."""

    def __init__(self, size: int | None, name: str = "chunk"):
        self.size = size
        self.name = name

    def run(self, n: int, fn: Callable[[int, int], None]) -> None:
        size = min(self.size or n, n)
        start = 0
        while start < n:
            stop = min(start + size, n)
            try:
                fn(start, stop)
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in torch >= 2.5
                if size == 1:
                    raise
                size = max(1, size // 2)
                self.size = size
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("out of memory: %s size lowered to %d", self.name, size)
                continue
            start = stop
        self.size = size


def default_window_batch(device: torch.device) -> int | None:
    """All windows at once on a GPU (halved on OOM); a few at a time on the CPU, where batching gains little."""
    return None if device.type == "cuda" else 8


def default_vae_batch(device: torch.device) -> int:
    """VAE windows per call: a 1024 px SD3.5 decode holds ~1 GB per activation in bf16, so a few at a time (on
    the CPU too, where 4-8 windows per call beat both 1 and all of them)."""
    return 4


#################################################################################
#                            Windowed noise prediction                          #
#################################################################################


def windowed_eps_fn(
    model_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    layout: WindowLayout,
    conds: Tensor,  # (N_windows, T, C) per-window conditions
    uncond: Tensor | None,  # (T, C) or (N, T, C) null condition; None: no guidance
    guidance_scale: float,
    guidance_interval: tuple[float, float] | None = None,
    window_batch: int | Chunker | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """eps_fn(x (1, C, H, W), t) -> (1, C_out, H, W): all windows, cond and uncond, batched; averaged overlaps."""
    positions = layout.positions
    n, w = len(positions), layout.window
    if conds.shape[0] != n:
        raise ValueError(f"{conds.shape[0]} window conditions for {n} windows")
    if uncond is not None and uncond.ndim == 2:
        uncond = uncond.unsqueeze(0).expand(n, -1, -1)
    chunker = window_batch if isinstance(window_batch, Chunker) else Chunker(window_batch, "window batch")
    count = None

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        nonlocal count
        if count is None or count.device != x.device:
            count = layout.coverage(x.device)
        total: list[Tensor] = []

        def chunk(a: int, b: int) -> None:
            xs = torch.stack([x[0, :, y : y + w, u : u + w] for y, u in positions[a:b]])  # (n, C, w, w)
            unc = uncond[a:b] if uncond is not None else None
            out = guided_prediction(model_fn, xs, t, conds[a:b], unc, guidance_scale, guidance_interval)
            if not total:
                total.append(torch.zeros(1, out.shape[1], layout.height, layout.width, device=x.device))
            for i, (y, u) in enumerate(positions[a:b]):
                total[0][0, :, y : y + w, u : u + w] += out[i]

        chunker.run(n, chunk)
        return total[0] / count

    return eps_fn


#################################################################################
#                                   Generation                                  #
#################################################################################


def default_stride(transformer: PixCellTransformer2DModel) -> int:
    """Half a window, rounded down to whole UNI tiles (64 latent px for PixCell-1024); one tile at least, so a
    one-token model (window = one tile) steps window by window."""
    window = transformer.config.sample_size
    tile = window // tokens_side(transformer.config.caption_num_tokens)
    return max(tile, window // 2 // tile * tile)


def region_layout(
    transformer: PixCellTransformer2DModel, grid_shape: tuple[int, int], stride: int | None
) -> WindowLayout:
    """The layout for a (Gh, Gw) token grid and this transformer (window = its sample_size; stride None: half a
    window, `default_stride`)."""
    window = transformer.config.sample_size
    m = tokens_side(transformer.config.caption_num_tokens)
    tile = window // m
    stride = default_stride(transformer) if stride is None else stride
    return window_layout(grid_shape[0] * tile, grid_shape[1] * tile, window, stride, m)


@torch.no_grad()
def denoise_region(
    transformer: PixCellTransformer2DModel,
    grid: Tensor,  # (Gh, Gw, C) UNI tokens of the region, row-major tiles
    stride: int | None = None,  # latent px between windows; None: half a window (64 for PixCell-1024)
    sampler: str = "dpm-solver",
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,  # None: the published default for the model's token count
    guidance_interval: tuple[float, float] | None = None,
    latents: Tensor | None = None,  # (1, 16, H, W) initial noise; default: drawn from `generator`
    generator: torch.Generator | None = None,
    window_batch: int | Chunker | None = None,  # windows per forward (x2 with guidance); None: all
    window_eps: Callable[..., Callable[[Tensor, Tensor], Tensor]]
    | None = None,  # tests, benchmarks: standins.reference_eps_fn
    progress: bool = True,
    allow_negative_guidance: bool = False,  # a guidance_scale < 0 is an error unless this says it is meant
    # resolved settings (the runner's): then leave the five above unset
    options: SamplingOptions | None = None,
    # (N_windows, T, C) dense conditions (dense_conditions.py) for a `dense_layout` at any stride
    window_conds: Tensor | None = None,
) -> Tensor:
    """Sliding-window denoising of a whole region: -> final model-space latents (1, 16, H, W).

    Each window's condition is its own sub-grid of `grid` (stride: whole tokens), or, with `window_conds`, the
    given row per window of `dense_conditions.dense_layout` (stride: any latent px; `grid` then only sets the
    region's size and channels)."""
    device = next(transformer.parameters()).device
    if window_conds is None:
        layout = region_layout(transformer, tuple(grid.shape[:2]), stride)
    else:
        if window_eps is not None:
            raise ValueError("window_conds and window_eps: the one-window reference takes a token grid only")
        window = transformer.config.sample_size
        tile = window // tokens_side(transformer.config.caption_num_tokens)
        stride = default_dense_stride(window) if stride is None else stride
        layout = dense_layout(grid.shape[0] * tile, grid.shape[1] * tile, window, stride)
    channels = transformer.config.caption_channels
    if grid.ndim != 3 or grid.shape[2] != channels:
        raise ValueError(f"token grid: expected shape (Gh, Gw, {channels}), got {tuple(grid.shape)}")
    if not torch.isfinite(grid).all():
        raise ValueError("token grid: contains NaN or Inf values")
    grid = grid.to(device, torch.float32)
    shape = (1, transformer.config.in_channels, layout.height, layout.width)
    if latents is None:
        latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
    if options is None:
        options = resolve_sampling(
            sampler,
            num_inference_steps,
            guidance_scale,
            transformer.config.caption_num_tokens,
            guidance_interval=guidance_interval,
            allow_negative_guidance=allow_negative_guidance,
        )
    scheduler = make_scheduler(options.sampler)
    steps, guidance_scale, guidance_interval = options.steps, options.guidance, options.guidance_interval
    # A distilled student takes the guidance scale as an input: one pass per window, no unconditional one.
    student = guidance_in_model(transformer)
    uncond = transformer.null_condition(1)[0] if guides(guidance_scale) and not student else None
    model_fn = transformer_fn(transformer, guidance_scale if student else None)
    if window_eps is not None:  # another windowing of the same guided model (the one-window reference)
        eps_fn = window_eps(model_fn, layout, grid, uncond, guidance_scale, guidance_interval)
    else:
        conds = window_conditions(grid, layout) if window_conds is None else window_conds.to(device)
        eps_fn = windowed_eps_fn(
            model_fn, layout, conds, uncond, guidance_scale, guidance_interval, window_batch
        )
    return denoise(eps_fn, latents.to(device), scheduler, steps, generator=generator, progress=progress)


#################################################################################
#                              Blended VAE decoding                             #
#################################################################################


def gaussian_window(size: int, sigma: float = 0.8, device: torch.device | str = "cpu") -> Tensor:
    """(size, size) weights exp(-(u^2 + v^2) / sigma^2), u, v in [-1, 1]; 1 at the centre (published kernel)."""
    u = torch.linspace(-1, 1, size, device=device)
    g = torch.exp(-(u**2) / sigma**2)
    return g[:, None] * g[None, :]


@torch.no_grad()
def decode_region(
    vae: AutoencoderKL,
    latents: Tensor,  # (1, 16, H, W) model-space latents
    window: int = 128,  # latent px per decoded window
    stride: int = 64,  # latent px between decoded windows
    sigma: float = 0.8,
    vae_batch: int | Chunker | None = None,  # windows per VAE call; None: all
    progress: bool = False,
) -> Tensor:
    """Decode a large latent window by window, blended with a Gaussian window -> (1, 3, 8H, 8W) in [0, 1]."""
    _, _, h, w = latents.shape
    layout = window_layout(
        h, w, window, stride, tokens_side=window, what="decode stride"
    )  # tile of 1 latent px: any stride
    f = vae_scale_factor(vae)
    device = latents.device
    kernel = gaussian_window(window * f, sigma, device)  # (wp, wp)
    image = torch.zeros(1, 3, h * f, w * f, device=device)
    weight = torch.zeros(1, 1, h * f, w * f, device=device)
    positions = layout.positions
    chunker = vae_batch if isinstance(vae_batch, Chunker) else Chunker(vae_batch, "VAE batch")
    bar = tqdm(total=len(positions), desc="decoding", disable=not progress, leave=False)

    def chunk(a: int, b: int) -> None:
        zs = torch.cat([latents[:, :, y : y + window, x : x + window] for y, x in positions[a:b]])
        decoded = decode_latents(vae, zs)  # (n, 3, wp, wp) in [0, 1]
        for i, (y, x) in enumerate(positions[a:b]):
            ys, xs = slice(y * f, (y + window) * f), slice(x * f, (x + window) * f)
            image[0, :, ys, xs] += decoded[i] * kernel
            weight[0, 0, ys, xs] += kernel
        bar.update(b - a)

    chunker.run(len(positions), chunk)
    bar.close()
    return (image / weight).clamp(0, 1)
