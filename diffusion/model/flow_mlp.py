"""The flow-matching MLP that translates UNI2-h embeddings of H&E tiles into those of the matching IHC tiles.

One token at a time (the 16 tokens of a 1024 px image are independent samples): a rectified flow
(Liu et al. 2022) from x_0 = H&E token to x_1 = IHC token, trained on roughly paired H&E/IHC images.

    x_t = t * ihc + (1 - t) * he,  t ~ U(0, 1),  target velocity v = ihc - he
    loss = || f(x_t, 999 t) - v ||^2                         (mean over tokens and channels)
    ihc_hat = Euler integration of dx/dt = f(x, 999 t) from t = 0 (he) to t = 1

The network is the residual MLP of the published checkpoints (`../shared/formats/flow_mlp_keys.json`, the
RDM-style "SimpleMLP" of the PixCell virtual-staining release): its state dict loads strictly, key for key.
Sizes are constructor arguments (defaults: the published 1536 -> 1024 x 6 -> 1536), so tests use tiny ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# The timestep embedding, residual block, loss and Euler integration are the library's (shared with the UNI prior);
# re-exported here under the names this module has always had.
from diffusion.flow import TIME_SCALE, ResBlock, euler_integrate, timestep_embedding
from diffusion.flow import flow_matching_loss as _flow_loss
from diffusion.flow import zero_init as _zero
from diffusion.model.state_dicts import read_state_dict

__all__ = [
    "FLOW_GRIDS",
    "TIME_SCALE",
    "FlowMLP",
    "FlowMLPConfig",
    "ResBlock",
    "flow_matching_loss",
    "load_flow_mlp",
    "read_state_dict",
    "rescale_norm",
    "save_flow_mlp",
    "timestep_embedding",
    "translation_metrics",
]

FLOW_GRIDS = ("uniform", "clipped")  # Euler time grids of `FlowMLP.translate`


#################################################################################
#                                  Model                                        #
#################################################################################


@dataclass
class FlowMLPConfig:
    """Sizes of the flow MLP. Defaults: the published virtual-staining checkpoints (UNI2-h, 1536-d tokens)."""

    in_channels: int = 1536  # UNI embedding size (H&E side)
    time_embed_dim: int = 1024  # width of the timestep MLP
    model_channels: int = 1024  # residual stream width (also the sinusoidal embedding size)
    bottleneck_channels: int = 1024  # width inside each residual block
    out_channels: int = 1536  # UNI embedding size (IHC side)
    num_res_blocks: int = 6
    dropout: float = 0.0


class FlowMLP(nn.Module):
    """Velocity field v(x, t) on UNI tokens: forward(x (N, C_in), t (N,) on the 0..999 scale) -> (N, C_out)."""

    def __init__(self, config: FlowMLPConfig | None = None, **sizes):
        super().__init__()
        self.config = config = config or FlowMLPConfig(**sizes)
        if config.in_channels != config.out_channels:
            # A flow moves points inside one space; integration needs in == out.
            raise ValueError(
                f"flow MLP: in_channels ({config.in_channels}) must equal out_channels ({config.out_channels})"
            )
        c = config.model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(c, config.time_embed_dim),
            nn.SiLU(),
            nn.Linear(config.time_embed_dim, config.time_embed_dim),
        )
        self.input_proj = nn.Linear(config.in_channels, c)
        self.res_blocks = nn.ModuleList(
            [
                ResBlock(c, config.bottleneck_channels, config.time_embed_dim, config.dropout)
                for _ in range(config.num_res_blocks)
            ]
        )
        self.out = nn.Sequential(
            nn.LayerNorm(c, eps=1e-6), nn.SiLU(), _zero(nn.Linear(c, config.out_channels))
        )

    @property
    def embed_dim(self) -> int:
        return self.config.in_channels

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (N, C) tokens, t: (N,) or scalar timesteps on the 0..999 scale -> velocity (N, C)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # (N, E)
        h = self.input_proj(x)  # (N, c)
        for block in self.res_blocks:
            h = block(h, emb)
        return self.out(h)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def translate(
        self, he: Tensor, steps: int = 100, progress: bool = False, grid: str = "uniform"
    ) -> Tensor:
        """Integrate the flow with `steps` Euler steps of dt = 1 / steps: H&E tokens (..., C) -> IHC tokens (..., C).

        grid "uniform": left-point Euler on t_i = i / steps, i = 0 .. steps-1 (the published setting: 100 steps).
        grid "clipped": t = linspace(1e-3, 1 - 1e-3, steps), as a public script version of the published
        notebook does it (uncertain: `../shared/formats/hub_api.md`).
        """
        if steps < 1:
            raise ValueError(f"flow steps must be >= 1, got {steps}")
        if grid not in FLOW_GRIDS:
            raise ValueError(f"flow grid {grid!r}: expected one of {', '.join(FLOW_GRIDS)}")
        if he.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"flow MLP expects {self.config.in_channels}-d UNI tokens, got shape {tuple(he.shape)}"
            )
        if not torch.isfinite(he).all():
            raise ValueError("H&E embeddings contain NaN or Inf values")
        param = next(self.parameters())
        x = he.reshape(-1, he.shape[-1]).to(param.device, torch.float32)
        times = (
            None if grid == "uniform" else torch.linspace(1e-3, 1 - 1e-3, steps, dtype=torch.float64).tolist()
        )
        x = euler_integrate(
            lambda x, t: self(x.to(param.dtype), t.to(param.dtype)).float(), x, steps, progress, times=times
        )
        return x.view(he.shape).to(he.dtype)


def rescale_norm(ihc: Tensor, he: Tensor) -> Tensor:
    """IHC tokens (..., T, C) scaled so that their mean L2 norm over the T tokens of each image equals that of the
    H&E tokens they were translated from (the public script rescales over its batch; per image here, so an
    image's result does not depend on what it is batched with)."""
    ratio = he.float().norm(dim=-1).mean(dim=-1, keepdim=True) / ihc.float().norm(dim=-1).mean(
        dim=-1, keepdim=True
    )
    return (ihc.float() * ratio.unsqueeze(-1)).to(ihc.dtype)


#################################################################################
#                            Objective and metrics                              #
#################################################################################


def flow_matching_loss(
    velocity: Callable[[Tensor, Tensor], Tensor],
    he: Tensor,  # (..., C) H&E tokens
    ihc: Tensor,  # (..., C) IHC tokens paired with them
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rectified-flow loss, one t ~ U(0, 1) per token: mean || v(x_t, 999 t) - (ihc - he) ||^2."""
    return _flow_loss(velocity, he.reshape(-1, he.shape[-1]), ihc.reshape(-1, ihc.shape[-1]), generator)


@torch.no_grad()
def translation_metrics(model: FlowMLP, he: Tensor, ihc: Tensor, steps: int = 100) -> dict[str, float]:
    """How close the integrated flow lands to the real IHC tokens, beside the identity (no translation).

    he, ihc: (N, T, C). Returns mse / cosine of flow(he) vs ihc, and identity_mse / identity_cosine of he vs ihc.
    """
    pred = model.translate(he.float(), steps=steps)
    ihc = ihc.float().to(pred.device)
    he = he.float().to(pred.device)

    def mse(a: Tensor) -> float:
        return float(((a - ihc) ** 2).mean())

    def cos(a: Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a, ihc, dim=-1).mean())

    return {"mse": mse(pred), "cosine": cos(pred), "identity_mse": mse(he), "identity_cosine": cos(he)}


#################################################################################
#                              Saving and loading                               #
#################################################################################


def infer_flow_config(state: dict[str, Tensor]) -> FlowMLPConfig:
    """Read the sizes off a state dict in the published layout (so any width/depth loads)."""
    try:
        c, c_in = state["input_proj.weight"].shape
        blocks = {int(k.split(".")[1]) for k in state if k.startswith("res_blocks.")}
        mid = state["res_blocks.0.in_layers.2.weight"].shape[0] if blocks else c
        return FlowMLPConfig(
            in_channels=c_in,
            time_embed_dim=state["time_embed.0.weight"].shape[0],
            model_channels=c,
            bottleneck_channels=mid,
            out_channels=state["out.2.weight"].shape[0],
            num_res_blocks=len(blocks),
        )
    except KeyError as err:
        raise ValueError(f"not a flow-MLP state dict (missing {err.args[0]})") from None


def save_flow_mlp(model: FlowMLP, path: str | Path) -> Path:
    """Write the weights as safetensors (the sizes go into the file's metadata), atomically."""
    import json

    from safetensors.torch import save_file

    from diffusion.atomic import atomic_path

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pixcell-flow-mlp", "config": json.dumps(asdict(model.config))}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def load_flow_mlp(path: str | Path, device: str | torch.device = "cpu") -> FlowMLP:
    """Load a flow MLP from our safetensors or a published `.pth`; strict: every key and shape must match."""
    state = read_state_dict(path, "flow MLP")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        config = infer_flow_config(state)
        model = FlowMLP(config)
    except ValueError as err:
        raise ValueError(f"flow MLP {path}: {err}") from None
    from diffusion.model.state_dicts import check_state_dict

    check_state_dict(model, state, f"flow MLP {path}")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)
