"""Loading and saving PixCell transformers from every published source, strictly.

Sources: a Hugging Face hub id (`StonyBrook-CVLab/PixCell-256`), a diffusers folder (a pipeline folder with
`transformer/`, or a transformer folder with `config.json`), or an original PixArt-style checkpoint file
(`.pth`/`.ckpt`/`.pt` holding `state_dict`/`state_dict_ema`), or a LoRA student folder (diffusion/model/student.py).
Strict means no missing key, no unexpected key,
no shape mismatch: otherwise one ValueError line that names the first offending keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import atomic_path
from ..checkpoints import resolve_init_source
from .original_format import (
    diffusers_to_original,
    infer_config,
    original_to_diffusers,
    read_original_checkpoint,
)
from .pixcell_transformer import PixCellTransformer2DModel, sincos_2d
from .state_dicts import check_state_dict
from .student import is_lora_student, load_lora_student, student_teacher

ORIGINAL_SUFFIXES = (".pth", ".ckpt", ".pt")


def load_original_checkpoint(
    path: str | Path,
    ema: bool = True,
    config: dict | None = None,
    head_dim: int = 72,
) -> PixCellTransformer2DModel:
    """Build a transformer from an original checkpoint.

    Config: `config` if given, else the `pixcell_config` entry our own writer adds (the original code ignores
    it), else read off the shapes (the head count assumes PixArt-XL's head dim of 72).
    """
    sd, stored = read_original_checkpoint(path, ema=ema)
    cfg = config or stored or infer_config(sd, head_dim=head_dim)
    try:
        mapped = original_to_diffusers(sd)
    except ValueError as err:  # unknown keys: say which file holds them
        raise ValueError(f"checkpoint {path}: {err}") from None
    with torch.device("meta"):
        model = PixCellTransformer2DModel(**cfg)
    check_state_dict(model, mapped, str(path))
    model.load_state_dict(mapped, strict=True, assign=True)
    # Buffers that the checkpoint does not store (the patch sin-cos table) are recomputed on the CPU.
    model.pos_embed.pos_embed = _patch_table(model)
    return model.eval()


def _patch_table(model: PixCellTransformer2DModel) -> Tensor:
    c = model.config
    grid = c.sample_size // c.patch_size
    return sincos_2d(model.inner_dim, grid, grid, model.pos_embed.interpolation_scale).unsqueeze(0)


def save_original_checkpoint(
    model: PixCellTransformer2DModel, path: str | Path, as_ema: bool = False
) -> Path:
    """Write the transformer as an original PixArt-style checkpoint (atomic)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out = diffusers_to_original(sd, pos_embed=_patch_table(model))
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    ckpt = {"state_dict": out, "pixcell_config": config}
    if as_ema:
        ckpt["state_dict_ema"] = out
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)


def _transformer_folder(path: Path) -> Path | None:
    """The folder holding the transformer's config.json inside a diffusers pipeline or transformer folder."""
    for cand in (path / "transformer", path):
        cfg = cand / "config.json"
        if cfg.is_file():
            try:
                name = json.loads(cfg.read_text()).get("_class_name", "")
            except json.JSONDecodeError:
                raise ValueError(f"{cfg}: not valid JSON") from None
            # The published ControlNet repo names its (unchanged) base transformer class differently.
            if name in ("PixCellTransformer2DModel", "PixCellTransformer2DModelControlNet", ""):
                return cand
    return None


def load_transformer(
    source: str | Path,
    ema: bool = True,
    torch_dtype: torch.dtype | None = None,
    subfolder: str | None = "transformer",
) -> PixCellTransformer2DModel:
    """Load a PixCell transformer from a hub id, a diffusers folder, an original checkpoint file, or a training
    work dir / checkpoint folder (`ema`: its EMA weights, the default for sampling, else the raw weights)."""
    path = Path(source)
    if path.suffix in ORIGINAL_SUFFIXES:
        model = load_original_checkpoint(path, ema=ema)
    elif path.is_dir() and is_lora_student(path):  # a few-MB LoRA student: its teacher + the adapter, merged
        return load_lora_student(path, load_transformer(student_teacher(path)), torch_dtype)
    elif path.is_dir():
        folder = _transformer_folder(path)
        if folder is None and ((path / "checkpoints").is_dir() or (path / "meta.json").is_file()):
            # A training work dir (its latest complete checkpoint) or one checkpoint: its portable weights.
            folder = Path(resolve_init_source(path, use_ema=ema))
        if folder is None:
            raise ValueError(
                f"{path}: no PixCell transformer here (expected config.json with "
                "_class_name PixCellTransformer2DModel, or a transformer/ subfolder)"
            )
        model = PixCellTransformer2DModel.from_pretrained(folder)
    elif path.exists():
        raise ValueError(
            f"{path}: expected a diffusers folder or an original checkpoint ({'/'.join(ORIGINAL_SUFFIXES)})"
        )
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/")):
        model = PixCellTransformer2DModel.from_pretrained(str(source), subfolder=subfolder)
    else:
        raise FileNotFoundError(f"{source}: no such file or folder (nor a hub id of the form owner/name)")
    return model.to(torch_dtype) if torch_dtype is not None else model
