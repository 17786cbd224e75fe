"""The original PixArt-style PixCell checkpoint layout <-> our (Hugging Face diffusers) layout.

An original checkpoint is a torch file holding `state_dict` and usually `state_dict_ema`. The map is explicit
(one line per key family, nanoGPT style) and checked: every source key must be consumed, every target key
produced, with the expected shape; otherwise a one-line ValueError names the first offenders.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

# Whole-tensor renames (original -> diffusers), outside the blocks.
_TOP_LEVEL = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "t_embedder.mlp.0.weight": "adaln_single.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "adaln_single.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "adaln_single.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "adaln_single.emb.timestep_embedder.linear_2.bias",
    "t_block.1.weight": "adaln_single.linear.weight",
    "t_block.1.bias": "adaln_single.linear.bias",
    "y_embedder.y_proj.fc1.weight": "caption_projection.linear_1.weight",
    "y_embedder.y_proj.fc1.bias": "caption_projection.linear_1.bias",
    "y_embedder.y_proj.fc2.weight": "caption_projection.linear_2.weight",
    "y_embedder.y_proj.fc2.bias": "caption_projection.linear_2.bias",
    "y_embedder.y_embedding": "caption_projection.uncond_embedding",
    "y_pos_embed": "y_pos_embed.y_pos_embed",
    "final_layer.linear.weight": "proj_out.weight",
    "final_layer.linear.bias": "proj_out.bias",
    "final_layer.scale_shift_table": "scale_shift_table",
}
# Per-block renames (original suffix -> diffusers suffix).
_BLOCK = {
    "scale_shift_table": "scale_shift_table",
    "attn.proj.weight": "attn1.to_out.0.weight",
    "attn.proj.bias": "attn1.to_out.0.bias",
    "cross_attn.q_linear.weight": "attn2.to_q.weight",
    "cross_attn.q_linear.bias": "attn2.to_q.bias",
    "cross_attn.proj.weight": "attn2.to_out.0.weight",
    "cross_attn.proj.bias": "attn2.to_out.0.bias",
    "mlp.fc1.weight": "ff.net.0.proj.weight",
    "mlp.fc1.bias": "ff.net.0.proj.bias",
    "mlp.fc2.weight": "ff.net.2.weight",
    "mlp.fc2.bias": "ff.net.2.bias",
}
# Fused original tensors split along dim 0 into several diffusers tensors.
_BLOCK_SPLIT = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _fail(what: str, keys: Iterable[str]) -> ValueError:
    keys = sorted(keys)
    shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    return ValueError(f"{what}: {shown}")


def original_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an original state dict to diffusers keys. `pos_embed` (a recomputed table) is dropped."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key == "pos_embed":
            continue
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
            continue
        m = _BLOCK_RE.match(key)
        if m is None:
            unknown.append(key)
            continue
        i, rest = m.groups()
        prefix = f"transformer_blocks.{i}."
        if rest in _BLOCK:
            out[prefix + _BLOCK[rest]] = value
            continue
        stem, _, kind = rest.rpartition(".")  # e.g. ("attn.qkv", "weight")
        if stem in _BLOCK_SPLIT and kind in ("weight", "bias"):
            parts = _BLOCK_SPLIT[stem]
            if value.shape[0] % len(parts):
                raise ValueError(
                    f"original key {key}: dim 0 ({value.shape[0]}) not divisible by {len(parts)}"
                )
            for name, chunk in zip(parts, value.chunk(len(parts), dim=0)):
                out[f"{prefix}{name}.{kind}"] = chunk.clone()
            continue
        unknown.append(key)
    if unknown:
        raise _fail("not a PixCell/PixArt checkpoint, unknown keys", unknown)
    return out


def diffusers_to_original(sd: dict[str, Tensor], pos_embed: Tensor | None = None) -> dict[str, Tensor]:
    """Inverse of `original_to_diffusers`; pass `pos_embed` (1, N, D) to store the patch table as the original did."""
    inv_top = {v: k for k, v in _TOP_LEVEL.items()}
    inv_block = {v: k for k, v in _BLOCK.items()}
    out: dict[str, Tensor] = {}
    if pos_embed is not None:
        out["pos_embed"] = pos_embed
    pending: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key in inv_top:
            out[inv_top[key]] = value
            continue
        m = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", key)
        if m is None:
            unknown.append(key)
            continue
        i, rest = m.groups()
        if rest in inv_block:
            out[f"blocks.{i}.{inv_block[rest]}"] = value
            continue
        stem, _, kind = rest.rpartition(".")
        for fused, parts in _BLOCK_SPLIT.items():
            if stem in parts:
                pending.setdefault(f"blocks.{i}.{fused}.{kind}", {})[stem] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise _fail("not a PixCell transformer state dict, unknown keys", unknown)
    for key, got in pending.items():
        parts = _BLOCK_SPLIT[key.split(".", 2)[2].rsplit(".", 1)[0]]
        missing = [p for p in parts if p not in got]
        if missing:
            raise ValueError(f"cannot fuse {key}: missing {missing}")
        out[key] = torch.cat([got[p] for p in parts], dim=0)
    return out


def infer_config(sd: dict[str, Tensor], head_dim: int = 72) -> dict:
    """Read the transformer config off an original state dict's shapes.

    Heads are hidden // head_dim (72 for PixArt-XL). The patch-position interpolation scale is found by
    matching the stored `pos_embed` table against the candidates PixCell uses; without a table, it defaults
    to the published value for that size (0.5 at 256 px, 1.0 at 512, 2.0 at 1024).
    """
    from .pixcell_transformer import sincos_2d

    try:
        proj = sd["x_embedder.proj.weight"]  # (D, C, p, p)
        null = sd["y_embedder.y_embedding"]  # (T, C_uni)
    except KeyError as err:
        raise ValueError(f"not a PixCell/PixArt checkpoint: missing key {err.args[0]}") from None
    hidden, in_channels, patch, _ = proj.shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k)))
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    num_tokens, uni_dim = null.shape
    if "pos_embed" in sd:
        grid = math.isqrt(sd["pos_embed"].shape[1])
    else:
        grid = {1: 16, 4: 32, 16: 64}.get(num_tokens, 16)
    sample_size = grid * patch
    default_interp = {16: 0.5, 32: 1.0, 64: 2.0}.get(grid, max(sample_size // 64, 1))
    interp = default_interp
    if "pos_embed" in sd:
        stored = sd["pos_embed"].float().reshape(grid * grid, hidden)
        for cand in (default_interp, 0.5, 1.0, 2.0, 4.0, 0.25):
            if torch.allclose(stored, sincos_2d(hidden, grid, grid, cand), atol=1e-4):
                interp = cand
                break
    if hidden % head_dim:
        raise ValueError(f"hidden size {hidden} is not a multiple of the head dim {head_dim}; pass head_dim")
    return dict(
        num_attention_heads=hidden // head_dim,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=depth,
        cross_attention_dim=hidden,
        sample_size=sample_size,
        patch_size=patch,
        interpolation_scale=interp,
        caption_channels=uni_dim,
        caption_num_tokens=num_tokens,
        use_additional_conditions=False,
    )


def read_original_checkpoint(path: str | Path, ema: bool = True) -> tuple[dict[str, Tensor], dict | None]:
    """(state dict, stored config or None) of an original checkpoint (`state_dict_ema` when `ema` and present).

    The config is the `pixcell_config` entry that our writer adds beside the weights; the original code ignores it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickle of arbitrary objects, not a torch file
        raise ValueError(
            f"checkpoint {path}: cannot be read as a torch file ({type(err).__name__})"
        ) from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path}: expected a dict with 'state_dict'/'state_dict_ema'")
    config = ckpt.get("pixcell_config") if isinstance(ckpt.get("pixcell_config"), dict) else None
    for key in ("state_dict_ema", "state_dict") if ema else ("state_dict",):
        if key in ckpt:
            return ckpt[key], config
    if all(isinstance(v, Tensor) for v in ckpt.values()):  # a bare state dict
        return ckpt, None
    raise ValueError(
        f"checkpoint {path}: no 'state_dict' or 'state_dict_ema' inside (keys: {sorted(ckpt)[:5]})"
    )
