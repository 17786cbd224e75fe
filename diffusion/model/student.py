"""A few-step student of PixCell: the teacher's architecture plus a guidance embedding, full-weight or LoRA.

The student is a `PixCellTransformer2DModel` with `guidance_embeds=True` (config.json says so), so it saves and
loads through the same diffusers class; the published layout, which has no such key, still loads strictly into
a plain model. Two kinds:

- full: every weight trained; saved as a diffusers folder (config.json + diffusion_pytorch_model.safetensors).
- LoRA (like LCM-LoRA, Luo et al. 2023b): the teacher's weights frozen, low-rank adapters on the attention
  projections (the project's LoRA, diffusion/model/lora.py) and the (new) guidance embedding trained; saved as a
  folder of a few MB: `student.json` (the teacher source), `adapter.safetensors` (lora.py's adapter file, rank,
  alpha and targets in its metadata) and `guidance_embedder.safetensors`. Loading rebuilds the teacher, adds the
  adapter and the guidance embedding and merges them, which gives a plain student model.

Either folder holds `sampling.json`, the defaults the sampling tools read (sampler, steps, guidance), so
`tools/sample.py --model STUDENT` needs no sampler flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import atomic_path
from .lora import (
    LoRASettings,
    add_lora,
    has_lora,
    load_lora_weights,
    merge_lora,
    merged_state_dict,
    read_lora_file,
    save_lora_weights,
)
from .pixcell_transformer import PixCellTransformer2DModel

SAMPLING_FILE = "sampling.json"
STUDENT_FILE = "student.json"
ADAPTER_FILE = "adapter.safetensors"
GUIDANCE_FILE = "guidance_embedder.safetensors"
# The published LCM-LoRA targets: the attention projections of every block (self- and cross-attention).
LORA_TARGETS = ("self_attn", "cross_attn")


def student_from_teacher(teacher: PixCellTransformer2DModel) -> PixCellTransformer2DModel:
    """A student initialised from `teacher` (its weights copied; the guidance embedding's output at zero, so the
    student starts as the teacher's conditional model)."""
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = PixCellTransformer2DModel(**{**config, "guidance_embeds": True})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("guidance_embedder.") for k in missing):
        raise ValueError(
            f"teacher does not fit the student: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return student.to(next(teacher.parameters()).dtype)


def add_student_lora(student: PixCellTransformer2DModel, rank: int, alpha: float | None = None) -> list[str]:
    """Freeze `student` and add a LoRA adapter (diffusion/model/lora.py) on the attention projections of every
    block; the guidance embedding stays trainable. -> the names of the trainable parameters."""
    add_lora(student, LoRASettings(rank=rank, alpha=alpha or rank, targets=LORA_TARGETS))
    student.guidance_embedder.requires_grad_(True)
    return [n for n, p in student.named_parameters() if p.requires_grad]


def student_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain student weights of a model that may carry a LoRA adapter (merged in, `merged_state_dict`)."""
    return merged_state_dict(model) if has_lora(model) else model.state_dict()


def save_lora_student(model: nn.Module, folder: str | Path, teacher: str) -> Path:
    """A LoRA student folder (student.json, the adapter in lora.py's file layout, the guidance embedding),
    atomically; sampling.json is added by the caller (`write_sampling_defaults`)."""
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        (tmp / STUDENT_FILE).write_text(
            json.dumps({"kind": "lora", "teacher": str(teacher)}, indent=1) + "\n"
        )
        save_lora_weights(model, tmp / ADAPTER_FILE)  # rank, alpha and targets in its metadata
        guidance = {k: v.detach().cpu().contiguous() for k, v in model.guidance_embedder.state_dict().items()}
        save_file(guidance, tmp / GUIDANCE_FILE, metadata={"format": "pt"})
    return folder


def student_teacher(folder: str | Path) -> str:
    """The teacher source recorded in a LoRA student folder's student.json."""
    folder = Path(folder)
    info = json.loads((folder / STUDENT_FILE).read_text())
    if info.get("kind") != "lora":
        raise ValueError(f"{folder / STUDENT_FILE}: kind {info.get('kind')!r}, expected 'lora'")
    return info["teacher"]


def load_lora_student(
    folder: str | Path, teacher: PixCellTransformer2DModel, torch_dtype: torch.dtype | None = None
) -> PixCellTransformer2DModel:
    """`teacher` (loaded from `student_teacher(folder)` by diffusion.model.loading) + guidance embedding +
    adapter, merged: a plain student model (guidance_embeds=True), strictly checked (the adapter by
    `load_lora_weights`, the guidance embedding by its own keys)."""
    folder = Path(folder)
    student_teacher(folder)  # checks the kind
    student = student_from_teacher(teacher)
    state, settings = read_lora_file(folder / ADAPTER_FILE)
    add_lora(student, settings)
    load_lora_weights(student, folder / ADAPTER_FILE, state)
    guidance = load_file(folder / GUIDANCE_FILE)
    try:
        student.guidance_embedder.load_state_dict(guidance, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{folder / GUIDANCE_FILE}: not this student's guidance embedding ({err})") from None
    plain = merge_lora(student)
    return plain.to(torch_dtype) if torch_dtype is not None else plain


def is_lora_student(folder: Path) -> bool:
    return (folder / STUDENT_FILE).is_file() and (folder / ADAPTER_FILE).is_file()


#################################################################################
#                      Sampling defaults recorded beside the weights            #
#################################################################################


def write_sampling_defaults(folder: str | Path, sampler: str, steps: int, guidance: float, **extra) -> Path:
    """`<folder>/sampling.json`: what the sampling tools use when no flag says otherwise."""
    path = Path(folder) / SAMPLING_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(
            json.dumps({"sampler": sampler, "steps": steps, "guidance": guidance, **extra}, indent=1)
        )
    return path


def read_sampling_defaults(source: str | Path) -> dict:
    """The recorded defaults of a model source: `sampling.json` in the folder (or its `transformer/`), or in the
    work dir a checkpoint belongs to; {} when there is none (hub ids, published weights)."""
    path = Path(source)
    if not path.is_dir():
        return {}
    candidates = [path, path / "transformer"]
    # A checkpoint's portable folder (work/checkpoints/checkpoint-N/transformer_ema) or a checkpoint: the work dir.
    for parent in (path.parent, path.parent.parent, path.parent.parent.parent):
        if parent.name == "checkpoints":
            candidates.append(parent.parent)
    for folder in candidates:
        if (folder / SAMPLING_FILE).is_file():
            try:
                return json.loads((folder / SAMPLING_FILE).read_text())
            except json.JSONDecodeError:
                raise ValueError(f"{folder / SAMPLING_FILE}: not valid JSON") from None
    return {}
