"""Where training checkpoints live on disk: naming, completeness, the latest one of a work dir.

A leaf module (it imports nothing from `diffusion.model` or `diffusion.training`), so that the model loaders
(`model/loading.py`: `load_transformer(work_dir)`) and the trainers (`training/checkpoint.py`, `training/init.py`)
read the same layout without importing each other. Writing checkpoints is `training/checkpoint.py`'s job.

    <work_dir>/checkpoints/checkpoint-<step:07d>/    complete once its meta.json (written last) is there
        transformer/, transformer_ema/               portable diffusers folders (--load-from, export)
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def is_complete(path: str | Path) -> bool:
    """A checkpoint folder is complete when its meta.json (written last, before the rename) is there."""
    return (Path(path) / "meta.json").is_file() and _NAME.match(Path(path).name) is not None


def list_checkpoints(work_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `<work_dir>/checkpoints`, oldest first (by step)."""
    root = Path(work_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint to resume from: `path` itself if it is one, else the newest complete one in work dir `path`."""
    path = Path(path)
    if is_complete(path):
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def resolve_init_source(source: str | Path, use_ema: bool = False) -> str:
    """Map a work dir or training checkpoint to its portable weights folder; other sources pass through."""
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(
                f"load_from {path}: no complete checkpoint here (expected a work dir with checkpoints/checkpoint-*, "
                "a checkpoint folder, a diffusers folder or an original .pth)"
            )
        folder = ckpt / ("transformer_ema" if use_ema else "transformer")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"load_from {ckpt}: no portable weights in {folder.name}/")
        return str(folder)
    return str(source)
