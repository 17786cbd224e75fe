"""Plain tensor dicts of weights: reading them from any file, and checking one strictly against a model.

The lowest layer of the model package: every loader (transformers, LoRA adapters, the UNI prior, the flow MLP)
reads and checks its weights here, so a mismatch is always the same one-line error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def check_state_dict(model: torch.nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """Raise one ValueError line if `sd` does not match `model` key for key and shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    if mismatched:
        problems.append(f"shape mismatch (checkpoint vs model): {first(mismatched)}")
    if missing:
        problems.append(f"missing keys: {first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {first(unexpected)}")
    if problems:
        raise ValueError(f"{source}: does not match the model ({'; '.join(problems)})")


def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """A plain tensor dict from .safetensors or a torch file (.pth/.pt/.bin); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{what} {path}: cannot read weights ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model", "module"):  # common training wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what} {path}: expected a dict of tensors")
    return state
