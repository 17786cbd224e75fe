"""LoRA on the cross-attention of a PixCell transformer (peft), and its weights on disk.

The published virtual-staining adapters put rank-4, alpha-4 LoRA on `attn2.to_q`, `attn2.to_k`, `attn2.to_v`
and `attn2.to_out.0` of every block of PixCell-1024 (gaussian init of A, zero B: the adapted model starts as
the base model). Our transformer is a plain diffusers `ModelMixin` without `PeftAdapterMixin`, so the adapter
is injected with `peft.inject_adapter_in_model` (no change to the model class) and only LoRA parameters train.

On disk we write adapter weights only (a few hundred kB, not the 2.4 GB base), as safetensors in the diffusers
pipeline-LoRA layout: `transformer.transformer_blocks.0.attn2.to_q.lora_A.weight`, with rank, alpha and the
target modules in the file's metadata. `load_lora_weights` reads that, the peft layout (no prefix, with or
without the adapter name `.default`) and the published `.pth` files, which hold the whole adapted transformer
(base weights with `.base_layer.` names plus the LoRA weights): their base weights are loaded too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import Tensor, nn

from diffusion.atomic import atomic_path

from .flow_mlp import read_state_dict

log = logging.getLogger(__name__)

LORA_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
ADAPTER = "default"
PREFIX = "transformer."  # diffusers pipeline LoRA files prefix the component name
# Buffers older diffusers versions stored and that our model recomputes (the patch sin-cos table).
_RECOMPUTED = ("pos_embed.pos_embed",)


@dataclass
class LoRASettings:
    """LoRA hyperparameters; defaults are the published virtual-staining adapters."""

    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
            target_modules=list(self.targets),
        )


def add_lora(model: nn.Module, settings: LoRASettings | None = None) -> nn.Module:
    """Inject a LoRA adapter in place; afterwards only the `lora_A` / `lora_B` parameters require grad."""
    settings = settings or LoRASettings()
    if has_lora(model):
        raise ValueError("the model already has a LoRA adapter")
    inject_adapter_in_model(settings.peft_config(), model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.lora_settings = settings  # read back by save_lora_weights
    return model


def has_lora(model: nn.Module) -> bool:
    return any("lora_A" in name for name, _ in model.named_parameters())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if "lora_" in name]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter weights in the peft layout (`transformer_blocks.0.attn2.to_q.lora_A.weight`, no adapter name)."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter (call add_lora first)")
    return {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()
    }


def save_lora_weights(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter only (safetensors, diffusers `transformer.` prefix), atomically."""
    from safetensors.torch import save_file

    settings: LoRASettings = getattr(model, "lora_settings", LoRASettings())
    state = {PREFIX + k: v for k, v in lora_state_dict(model).items()}
    meta = {
        "format": "pixcell-lora",
        "rank": str(settings.rank),
        "alpha": str(settings.alpha),
        "target_modules": json.dumps(list(settings.targets)),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def read_lora_file(path: str | Path) -> tuple[dict[str, Tensor], LoRASettings]:
    """The weights of a LoRA file and its settings, reading the file once (published files hold 2.4 GB).

    Settings: rank/alpha/targets from our safetensors metadata; otherwise the rank is read off the `lora_A`
    weights and alpha = rank, targets = the published four (as in every published adapter; a file with other
    targets then fails the strict key check of `load_lora_weights`).
    """
    path = Path(path)
    state = read_state_dict(path, "LoRA weights")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == "pixcell-lora":
            settings = LoRASettings(
                rank=int(meta["rank"]),
                alpha=float(meta["alpha"]),
                targets=tuple(json.loads(meta["target_modules"])),
            )
            return state, settings
    ranks = {v.shape[0] for k, v in _normalise(state).items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"LoRA weights {path}: no lora_A weights, or mixed ranks {sorted(ranks)}")
    rank = ranks.pop()
    return state, LoRASettings(rank=rank, alpha=float(rank))


def read_lora_settings(path: str | Path) -> LoRASettings:
    """Settings of a LoRA file (see `read_lora_file`)."""
    return read_lora_file(path)[1]


def _normalise(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes and the adapter name: keys as our model names them, LoRA keys peft-style."""
    out = {}
    for key, value in state.items():
        for prefix in (PREFIX, "base_model.model.", "module."):
            key = key.removeprefix(prefix)
        key = key.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")
        out[key] = value
    return out


def load_lora_weights(
    model: nn.Module, path: str | Path, state: dict[str, Tensor] | None = None
) -> dict[str, int]:
    """Load adapter weights (or a published full adapted checkpoint) into a model with a LoRA adapter.

    Strict: every LoRA weight of the model must be in the file with the same shape, and no other LoRA weight;
    a file that also carries base weights must carry all of them. Returns counts {"lora": n, "base": m}.
    `state`: the file's weights when already read (`read_lora_file`), so a large file is not read twice.
    """
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter (call add_lora first)")
    source = f"LoRA weights {path}"
    state = _normalise(read_state_dict(path, "LoRA weights") if state is None else state)
    lora = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    base = {k: v for k, v in state.items() if k not in lora and k not in _RECOMPUTED}
    if not lora:
        raise ValueError(f"{source}: no lora_A/lora_B weights inside")

    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(lora)), sorted(set(lora) - set(own))
    shapes = [
        f"{k} {tuple(lora[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in lora and lora[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            for label, keys in (
                ("shape mismatch (file vs model)", shapes),
                ("missing", missing),
                ("unexpected", unexpected),
            )
            if keys
        )
        raise ValueError(f"{source}: does not match the model's adapter ({detail})")

    if base:  # the published .pth: the whole adapted transformer, checked and loaded as one state dict
        from diffusion.model.loading import check_state_dict

        full = {**base, **{_with_adapter(k): v for k, v in lora.items()}}
        check_state_dict(model, full, source)
        model.load_state_dict(full, strict=True)
        log.info("%s: holds the base transformer weights too (%d tensors); loaded them", path, len(base))
        return {"lora": len(lora), "base": len(base)}

    result = set_peft_model_state_dict(model, lora, adapter_name=ADAPTER)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"{source}: peft did not place {bad[:3]}")
    return {"lora": len(lora), "base": 0}


def _with_adapter(key: str) -> str:
    return key.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}.")


@torch.no_grad()
def lora_delta_norm(model: nn.Module) -> float:
    """Frobenius norm of all B @ A products: 0 for a fresh adapter (B starts at zero)."""
    total = 0.0
    for module in model.modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            delta = module.lora_B[ADAPTER].weight @ module.lora_A[ADAPTER].weight
            total += float(delta.float().pow(2).sum())
    return total**0.5
