"""UNIPrior: a rectified-flow generator of UNI2-h token sets, so PixCell can sample without a reference image.

PixCell generates well only from the UNI2-h embedding of a real patch; its null condition gives poor images
(CytoSyn, Table 1: UNI2-h FD 167 unconditional against 95.6 conditional for PixCell-256). ZoomLDM (CVPR 2025)
answers this with a second, small generative model over its conditioning embeddings; this is that model for
PixCell. It maps Gaussian noise to (T, C) UNI tokens, T = 1 for PixCell-256 and 16 (a row-major 4x4 grid of
256 px tiles) for PixCell-1024, optionally for a label (dataset or cancer type) with classifier-free guidance.

    x0 ~ N(0, I) in standardised token space, x1 = (tokens - data_mean) / data_std
    v(x_t, 999 t, label) is trained with the rectified-flow loss of `diffusion/flow.py`
    sample: Euler from x0 to t = 1, guidance v = v_u + w (v_c - v_u), then tokens = x * data_std + data_mean

Architecture, by token count: one token is a residual MLP (the flow MLP's blocks, conditioned on time + label);
16 tokens are a small DiT over the grid (diffusers' `BasicTransformerBlock` with PixArt's adaLN-single, a fixed
2-D sin-cos position per tile), so the 4x4 grid is generated jointly and is spatially coherent. A diffusers
`ModelMixin`/`ConfigMixin`: `save_pretrained` / `from_pretrained` like the PixCell transformer; the label names
and the standardisation statistics travel with the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from ..flow import ResBlock, euler_integrate, timestep_embedding, zero_init
from ..model.pixcell_transformer import sincos_2d
from ..sampling.samplers import guided_prediction

DEFAULT_FLOW_STEPS = 50  # Euler steps when sampling (the flow is nearly straight; see docs/prior.md)


#################################################################################
#                                  Model                                        #
#################################################################################


class UNIPrior(ModelMixin, ConfigMixin):
    """Velocity field v(x, t, label) on standardised UNI token sets: forward((B, T, C), (B,) on 0..999, (B,))."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        num_tokens: int = 1,  # UNI tokens per sample: 1 (PixCell-256) or a square, 16 (PixCell-1024)
        channels: int = 1536,  # UNI2-h embedding size
        width: int = 1024,  # hidden size of the MLP / transformer
        depth: int = 6,  # residual blocks (1 token) or transformer blocks (a grid)
        num_heads: int = 8,  # attention heads (grid only)
        labels: Sequence[str] | None = None,  # label names for conditional sampling; None: unconditional
        dropout: float = 0.0,
    ):
        super().__init__()
        side = math.isqrt(num_tokens)
        if num_tokens < 1 or side * side != num_tokens:
            raise ValueError(f"UNI prior: num_tokens {num_tokens} is not a square grid (1, 4, 16)")
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError("UNI prior: label names must be unique")
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        # Row len(labels) is the null label: what classifier-free guidance drops labels to.
        self.label_embed = nn.Embedding(len(labels) + 1, width) if labels else None
        self.input_proj = nn.Linear(channels, width)
        # Standardisation of the training tokens (per channel), set by the trainer; saved with the weights.
        self.register_buffer("data_mean", torch.zeros(channels))
        self.register_buffer("data_std", torch.ones(channels))
        if num_tokens == 1:
            self.res_blocks = nn.ModuleList([ResBlock(width, width, width, dropout) for _ in range(depth)])
            self.out = nn.Sequential(
                nn.LayerNorm(width, eps=1e-6), nn.SiLU(), zero_init(nn.Linear(width, channels))
            )
        else:
            # Tile positions: the same 2-D sin-cos as PixCell's patch grid (recomputed, not stored).
            pos = sincos_2d(width, side, base_size=side, interpolation_scale=1.0)
            self.register_buffer("pos_embed", pos[None], persistent=False)  # (1, T, width)
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # PixArt's adaLN-single
            self.blocks = nn.ModuleList(
                [
                    BasicTransformerBlock(
                        width,
                        num_heads,
                        width // num_heads,
                        dropout=dropout,
                        activation_fn="gelu-approximate",
                        norm_type="ada_norm_single",
                        norm_elementwise_affine=False,
                        norm_eps=1e-6,
                    )
                    for _ in range(depth)
                ]
            )
            self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.scale_shift_table = nn.Parameter(torch.randn(2, width) / width**0.5)
            self.proj_out = zero_init(nn.Linear(width, channels))

    # ------------------------------------------------------------------ properties

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def channels(self) -> int:
        return self.config.channels

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels or [])

    # ------------------------------------------------------------------ forward

    def embed(self, t: Tensor, labels: Tensor | None) -> Tensor:
        """Time (+ label) embedding (B, width); labels None or == len(labels) mean the null label."""
        emb = self.time_embed(timestep_embedding(t, self.config.width).to(self.input_proj.weight.dtype))
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((t.shape[0],), len(self.labels), dtype=torch.long, device=t.device)
            emb = emb + self.label_embed(labels)
        return emb

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """x (B, T, C) standardised tokens, t (B,) on 0..999, labels (B,) long or None -> velocity (B, T, C)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, labels)  # (B, W)
        h = self.input_proj(x)  # (B, T, W)
        if self.num_tokens == 1:
            h = h[:, 0]
            for block in self.res_blocks:
                h = block(h, emb)
            return self.out(h)[:, None]
        h = h + self.pos_embed.to(h.dtype)
        mod = self.t_block(emb)  # (B, 6W)
        for block in self.blocks:
            h = block(h, timestep=mod)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        return self.proj_out(self.norm_out(h) * (1 + scale) + shift)

    # ------------------------------------------------------------------ labels

    def label_ids(self, names: str | Sequence[str] | None, n: int) -> Tensor | None:
        """Label name(s) -> (n,) long ids; one-line ValueError for an unknown name or an unlabelled prior."""
        if names is None:
            return None
        names = [names] * n if isinstance(names, str) else list(names)
        if len(names) != n:
            raise ValueError(f"UNI prior: {len(names)} labels for {n} samples")
        if not self.labels:
            raise ValueError(f"this UNI prior was trained without labels; cannot sample label {names[0]!r}")
        known = {name: i for i, name in enumerate(self.labels)}
        for name in names:
            if name not in known:
                raise ValueError(f"unknown label {name!r}; this prior knows: {', '.join(self.labels)}")
        return torch.tensor([known[name] for name in names], dtype=torch.long)

    # ------------------------------------------------------------------ standardisation

    def set_data_stats(self, mean: Tensor, std: Tensor) -> None:
        """Per-channel mean and std of the training tokens (a floor keeps constant channels finite)."""
        self.data_mean.copy_(mean.reshape(-1))
        self.data_std.copy_(std.reshape(-1).clamp_min(1e-6))

    def standardise(self, tokens: Tensor) -> Tensor:
        return (tokens - self.data_mean) / self.data_std

    def unstandardise(self, x: Tensor) -> Tensor:
        return x * self.data_std + self.data_mean

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        n: int,
        label: str | Sequence[str] | None = None,  # one name for all, or one per sample; None: unconditional
        guidance: float = 1.0,  # w in v_u + w (v_c - v_u); 1: the conditional flow, no unconditional pass
        steps: int = DEFAULT_FLOW_STEPS,
        generator: torch.Generator | list[torch.Generator] | None = None,  # a list: one per sample (CPU)
        progress: bool = False,
    ) -> Tensor:
        """n synthetic UNI token sets (n, T, C), float32 on the model's device.

        With a list of generators, sample i's starting noise comes from generator i (drawn on the CPU), so a
        sample does not depend on the batch it is drawn in.
        """
        param = next(self.parameters())
        shape = (self.num_tokens, self.channels)
        if isinstance(generator, list):
            if len(generator) != n:
                raise ValueError(f"UNI prior: {len(generator)} generators for {n} samples")
            noise = torch.stack([torch.randn(shape, generator=g) for g in generator])
        else:
            noise = torch.randn(
                (n, *shape), generator=generator, device=generator.device if generator else "cpu"
            )
        cond = self.label_ids(label, n)
        uncond = None
        if cond is not None:
            cond = cond.to(param.device)
            uncond = torch.full_like(cond, len(self.labels))

        def model(x: Tensor, c: Tensor | None, t: Tensor) -> Tensor:
            return self(x.to(param.dtype), t.to(param.dtype), c).float()

        # The one guidance function of the codebase. The prior has no variance channels: x.shape[1] == T is the
        # whole output, so every token is guided.
        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return guided_prediction(model, x, t[0], cond, uncond, guidance)

        x = euler_integrate(velocity, noise.to(param.device, torch.float32), steps, progress, desc="prior")
        return self.unstandardise(x).float()


#################################################################################
#                              Loading and checks                               #
#################################################################################


def prior_folder(source: str | Path) -> Path:
    """A prior folder (config.json + weights), or a training work dir holding its exported `prior/`."""
    path = Path(source)
    for cand in (path, path / "prior"):
        if (cand / "config.json").is_file():
            return cand
    if not path.exists():
        raise FileNotFoundError(f"UNI prior {path}: no such folder")
    raise FileNotFoundError(
        f"UNI prior {path}: no config.json (expected a UNI prior folder, or a train_prior.py work dir with prior/)"
    )


def load_prior(source: str | Path, device: str | torch.device = "cpu") -> UNIPrior:
    """A saved UNIPrior, strictly (every key and shape, nothing missing or extra), in eval mode on `device`."""
    import json

    from safetensors.torch import load_file

    from ..model.state_dicts import check_state_dict

    folder = prior_folder(source)
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") != UNIPrior.__name__:
        raise ValueError(f"UNI prior {folder}: holds a {config.get('_class_name')!r}, not a UNIPrior")
    weights = folder / "diffusion_pytorch_model.safetensors"
    try:
        prior = UNIPrior.from_config(config)
        state = load_file(str(weights))
    except (
        Exception
    ) as err:  # a bad config value, a missing or truncated weights file (safetensors' own error)
        raise ValueError(f"UNI prior {folder}: cannot load ({type(err).__name__}: {err})") from None
    check_state_dict(prior, state, f"UNI prior {folder}")
    prior.load_state_dict(state, strict=True)
    return prior.eval().to(device)


def check_prior_fits(prior: UNIPrior, num_tokens: int, channels: int, where: str = "UNI prior") -> None:
    """The prior must make the token sets the PixCell model takes: one line naming both shapes otherwise."""
    if (prior.num_tokens, prior.channels) != (num_tokens, channels):
        raise ValueError(
            f"{where}: the prior makes ({prior.num_tokens}, {prior.channels}) UNI tokens per sample, the PixCell "
            f"model takes ({num_tokens}, {channels})"
        )
