"""Initialise a training run from earlier weights: the previous progressive stage, or published PixCell weights.

`--load-from SOURCE` accepts a work dir (its latest complete checkpoint), one checkpoint folder, a diffusers
folder or hub id (`StonyBrook-CVLab/PixCell-256`), or an original PixArt-style `.pth`. Weights move across
resolutions as in the published recipe (256 -> 512 -> 1024):

- every learned weight is copied, and must match in shape (another width or depth is an error, not a guess);
- the patch position table (`pos_embed`) is never stored: the new model computes it for its own sample size
  and interpolation scale;
- the UNI token position table (`y_pos_embed`) is fixed sin-cos, made for the new token count (absent at T=1);
- the null condition (`caption_projection.uncond_embedding`, (T, C)) is re-made for the new token count.
The returned InitReport lists what was copied and what was re-initialised, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints import resolve_init_source
from ..model.loading import load_transformer

# Fixed tables that depend on the token count / grid and are re-made when it changes.
TOKEN_POS_KEY = "y_pos_embed.y_pos_embed"
NULL_KEY = "caption_projection.uncond_embedding"


@dataclass
class InitReport:
    """What `initialise_from` did: the source, the keys copied, the keys re-initialised with the reason."""

    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"initialised from {self.source}: {len(self.loaded)} tensors copied"]
        lines += [f"  re-initialised {key}: {why}" for key, why in self.reinitialised]
        return "\n".join(lines)


@torch.no_grad()
def initialise_from(model: nn.Module, source: str | Path, use_ema: bool = False) -> InitReport:
    """Copy weights from `source` into `model` (a PixCellTransformer2DModel built for the new stage).

    use_ema: take the EMA weights where the source has both (training checkpoints, original .pth); published
    diffusers weights are EMA weights already.
    """
    resolved = resolve_init_source(source, use_ema)
    src_model = load_transformer(resolved, ema=use_ema)
    src, own = src_model.state_dict(), model.state_dict()
    sc, c = src_model.config, model.config
    for name in (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "patch_size",
        "in_channels",
        "out_channels",
        "caption_channels",
        "cross_attention_dim",
    ):
        if getattr(sc, name) != getattr(c, name):
            raise ValueError(
                f"load_from {source}: {name} is {getattr(sc, name)} in the source but {getattr(c, name)} in the "
                f"model being trained ({type(model).__name__} from the config): not the same architecture"
            )
    report = InitReport(source=str(resolved))
    new_state: dict[str, Tensor] = {}
    for key, value in own.items():
        if key in (TOKEN_POS_KEY, NULL_KEY) and (key not in src or src[key].shape != value.shape):
            was = tuple(src[key].shape) if key in src else "absent"
            what = "UNI token position table" if key == TOKEN_POS_KEY else "null condition (CFG)"
            report.reinitialised.append(
                (
                    key,
                    f"{what} re-made for {c.caption_num_tokens} token(s) (source: {sc.caption_num_tokens}, {was})",
                )
            )
            continue
        if key == TOKEN_POS_KEY and sc.sample_size != c.sample_size:
            report.reinitialised.append(
                (key, f"fixed sin-cos table recomputed for sample_size {c.sample_size}")
            )
            continue
        if key not in src:
            raise ValueError(f"load_from {source}: the source has no {key!r}")
        if src[key].shape != value.shape:
            raise ValueError(
                f"load_from {source}: {key} has shape {tuple(src[key].shape)} in the source, "
                f"{tuple(value.shape)} in the model"
            )
        new_state[key] = src[key]
        report.loaded.append(key)
    extra = sorted(set(src) - set(own) - {TOKEN_POS_KEY})
    if extra:
        raise ValueError(f"load_from {source}: keys the model does not have: {', '.join(extra[:3])}")
    model.load_state_dict(new_state, strict=False)
    if (sc.sample_size, sc.interpolation_scale) != (c.sample_size, c.interpolation_scale):
        report.reinitialised.append(
            (
                "pos_embed.pos_embed",
                f"patch position table recomputed for sample_size {c.sample_size}, interpolation_scale "
                f"{c.interpolation_scale} (source: {sc.sample_size}, {sc.interpolation_scale}; never stored)",
            )
        )
    return report
