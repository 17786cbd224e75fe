"""What a training task hands the LoRA trainer: its data, how a batch becomes model inputs, and its validation.

A task is a data builder (`build_features_data` in train_scripts/train_lora.py for stored features,
`diffusion.data.ihc_tokens.build_ihc_data` for virtual staining), never a second trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

# batch, noise generator -> (x0 (B, 16, h, w) in model space, UNI tokens (B, T, C))
Inputs = Callable[[dict, torch.Generator], tuple[Tensor, Tensor]]


@dataclass
class TaskData:
    """A task's training data and how a batch becomes model inputs."""

    dataset: Dataset
    collate: Callable[[list], dict | None]
    inputs: Inputs
    # the adapted model -> uint8 validation grid (`diffusion.training.validation.validation_grid`); None: none
    validation_grid: Callable[[torch.nn.Module], np.ndarray] | None = None
    # dataset indices never trained on (validation), the same on every rank
    held_out: list[int] = field(default_factory=list)
    # what a sample is called in log lines and the failure message
    what: str = "samples"
    # extra run facts for environment.json
    info: dict = field(default_factory=dict)
