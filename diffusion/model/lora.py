"""LoRA adapters on a PixCell transformer (peft), their files, scaling and merging.

Used by the LoRA fine-tuning trainer (`train_scripts/train_lora.py`, which also trains the virtual-staining
adapters), the pipelines (`PixCellPipeline.load_lora_weights`) and the stainer. Our transformer is a plain diffusers
`ModelMixin` without `PeftAdapterMixin`, so the adapter is injected with `peft.inject_adapter_in_model` (no change
to the model class) and only the LoRA parameters train. Target modules are module-name suffixes inside each block
(`attn2.to_q`), or the groups `self_attn`, `cross_attn` and `ff` (`TARGET_GROUPS`). The published
virtual-staining adapters put rank-4, alpha-4 LoRA on `attn2.to_q/to_k/to_v/to_out.0` of every block of
PixCell-1024 (gaussian init of A, zero B: the adapted model starts as the base model).

On disk we write adapter weights only (a few hundred kB, not the 2.4 GB base), as safetensors in the diffusers
pipeline-LoRA layout: `transformer.transformer_blocks.0.attn2.to_q.lora_A.weight`, with rank, alpha and the
target modules in the file's metadata. `load_lora_weights` reads that, the peft layout (no prefix, with or
without the adapter name `.default`) and the published `.pth` files, which hold the whole adapted transformer
(base weights with `.base_layer.` names plus the LoRA weights): their base weights are loaded too.
`save_published_lora` writes that published layout, so adapters trained here run in the published notebook.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from ..atomic import atomic_path
from .state_dicts import check_state_dict, read_state_dict

log = logging.getLogger(__name__)

LORA_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # published: cross-attention
# Named groups of target modules (diffusers' BasicTransformerBlock names), for configs and the command line.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "self_attn": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
    "cross_attn": LORA_TARGETS,
    "ff": ("ff.net.0.proj", "ff.net.2"),
}
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

    def __post_init__(self) -> None:
        self.targets = resolve_targets(self.targets)
        if self.rank < 1:
            raise ValueError(f"lora.rank {self.rank}: expected >= 1")

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
            target_modules=list(self.targets),
        )


def resolve_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Target module suffixes, with the group names of `TARGET_GROUPS` expanded (order kept, no repeats)."""
    items = [targets] if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for item in items:
        for name in TARGET_GROUPS.get(item, (item,)):
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError(f"lora.targets: empty (give module names or {', '.join(TARGET_GROUPS)})")
    return tuple(out)


def add_lora(model: nn.Module, settings: LoRASettings | None = None) -> nn.Module:
    """Inject a LoRA adapter in place; afterwards only the `lora_A` / `lora_B` parameters require grad."""
    settings = settings or LoRASettings()
    if has_lora(model):
        raise ValueError("the model already has a LoRA adapter")
    names = [n for n, _ in model.named_modules()]
    absent = [t for t in settings.targets if not any(n.endswith("." + t) for n in names)]
    if absent:
        raise ValueError(f"lora.targets: no module named {', '.join(absent)} in the transformer blocks")
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
    lora_a = {k: v for k, v in _normalise(state).items() if ".lora_A." in k}
    ranks = {v.shape[0] for v in lora_a.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA weights {path}: no lora_A weights, or mixed ranks {sorted(ranks)}")
    rank = ranks.pop()
    # `transformer_blocks.3.attn2.to_q.lora_A.weight` -> `attn2.to_q`; the published order first.
    found = {k.split(".lora_A.")[0].split(".", 2)[2] for k in lora_a if k.startswith("transformer_blocks.")}
    targets = tuple(t for t in LORA_TARGETS if t in found) + tuple(sorted(found - set(LORA_TARGETS)))
    return state, LoRASettings(rank=rank, alpha=float(rank), targets=targets or LORA_TARGETS)


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


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale the adapter's effect: W + scale * (alpha / r) B A (1: as trained, 0: the base model)."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter")
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(ADAPTER, float(scale))


def lora_scale(model: nn.Module) -> float:
    """The current scale factor of the adapter (1.0 as trained)."""
    for module in model.modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.scaling:
            return module.scaling[ADAPTER] * module.r[ADAPTER] / module.lora_alpha[ADAPTER]
    raise ValueError("the model has no LoRA adapter")


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain transformer state dict with the adapter (at its current scale) folded in: W + s B A.

    Computed from the LoRA layers without touching `model`, so the adapted model keeps working afterwards.
    """
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter")
    merged: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            base = module.get_base_layer()
            delta = module.get_delta_weight(ADAPTER)  # s * B @ A, in the base weight's shape and dtype
            merged[f"{name}.weight"] = (base.weight + delta.to(base.weight.dtype)).detach().clone()
            if base.bias is not None:
                merged[f"{name}.bias"] = base.bias.detach().clone()
    for key, value in model.state_dict().items():
        if "lora_" in key or ".base_layer." in key:
            continue
        merged[key] = value.detach().clone()
    return merged


def merge_lora(model: nn.Module) -> nn.Module:
    """A new model of the same class and config with the adapter folded into its weights (no peft layers)."""
    state = merged_state_dict(model)
    plain = type(model).from_config(model.config)  # recomputes the buffers the state dict does not hold
    check_state_dict(plain, state, "merged LoRA weights")
    plain.load_state_dict(state, strict=True)
    dtype = next(model.parameters()).dtype
    return (plain if dtype == torch.float32 else plain.to(dtype)).eval()


def save_published_lora(model: nn.Module, path: str | Path) -> Path:
    """The published virtual-staining `.pth` layout: the whole adapted transformer's state dict (base weights
    under `.base_layer.` names plus `lora_A/B.default` weights), as `torch.save` of a plain dict (atomic)."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter (call add_lora first)")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)
