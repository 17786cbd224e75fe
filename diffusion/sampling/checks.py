"""Is a generated image an image? Every path that writes or returns generated images checks them here first.

A sampler pushed past its schedule, a huge guidance scale or an extreme value in a condition gives NaN or Inf
latents; the VAE decodes them, `clamp` keeps NaN, and the uint8 cast turns NaN into 0: an all-black PNG, written
and recorded as done, exit 0, kept by every rerun. So latents and decoded images are checked per image: finite,
and not collapsed (a decoded image all black). A failed image is one line naming it and the
likely cause, and is never written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# UNI2-h embeddings are of order 1-10 (the largest seen on real tiles is below 100); a condition with values far
# beyond this is damaged, and the likely cause of an unusable image made from it.
CONDITION_LIMIT = 1e4


class UnusableImage(ValueError):
    """A generated image that holds NaN/Inf or is all black; its message names the image and the likely
    cause. `condition_fault`: the image's own condition is damaged (other images of the run may be fine)."""

    def __init__(self, message: str, condition_fault: bool = False):
        super().__init__(message)
        self.condition_fault = condition_fault


def row_problem(x: Tensor, decoded: bool = False) -> str | None:
    """What is wrong with one latent or decoded image (C, h, w) in [0, 1], or None when it is usable.

    Latents must be finite (a step callback may legitimately set them, even to zeros). A decoded image must be
    finite and not all black: the VAE clamps to [0, 1], so a blank background tile may come out all white, but
    an image all 0 is never tissue; it is what NaN latents used to become."""
    x = x.detach().float()
    if not torch.isfinite(x).all():
        return "came out with NaN or Inf values"
    if decoded and x.max().item() == 0.0:
        return "came out all black (every value 0)"
    return None


def condition_problem(condition: Tensor | None) -> str | None:
    """Why a condition (T, C) would spoil its image: values that are not finite or far beyond UNI2-h's range."""
    if condition is None:
        return None
    c = condition.detach().float()
    if not torch.isfinite(c).all():
        return "its condition holds NaN or Inf"
    peak = c.abs().max().item()
    if peak > CONDITION_LIMIT:
        return f"its condition holds values up to {peak:.3g} (UNI2-h embeddings are of order 1-10)"
    return None


def check_images(
    x: Tensor,  # (B, C, h, w) latents or decoded images
    names: Sequence[str],  # one per row, as the message shows it
    what: str = "image",  # "latents" or "decoded image"
    conditions: Tensor
    | None = None,  # (B, T, C) the conditions of the rows, to name a damaged one as the cause
    on_unusable: Callable[[UnusableImage], None] | None = None,  # None: raise the first
) -> list[bool]:
    """Per row: True when usable. An unusable row raises `UnusableImage` naming it and the likely cause (a damaged
    condition, else the settings), or goes to `on_unusable` (a long run's skip counter), which may raise it."""
    usable = []
    for i, name in enumerate(names):
        problem = row_problem(x[i], decoded=what != "latents")
        usable.append(problem is None)
        if problem is None:
            continue
        cause = condition_problem(conditions[i] if conditions is not None else None)
        err = UnusableImage(
            f"{name}: the {what} {problem}, not written; likely cause: "
            + (
                cause
                or "steps beyond the sampler's schedule, a very large guidance scale, or a diverged model"
            ),
            condition_fault=cause is not None,
        )
        if on_unusable is None:
            raise err
        on_unusable(err)
    return usable
