"""Images without a reference: conditions drawn from a UNI prior, for the sampling runner and for Python users.

PriorSource     a condition source for `sample_patches` (`tools/sample.py --prior`): n_images conditions
                named `prior[_<label>]_<i>`, each from its own noise (seeded by the run's seed and its name),
                so a rerun or another sharding makes the same conditions; no real images
sample_images   prior -> conditions -> PixCellPipeline, in one call
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..sampling.conditions import ConditionSource, Loaded, Spec, name_seed
from .model import DEFAULT_FLOW_STEPS, UNIPrior, check_prior_fits

if TYPE_CHECKING:
    from ..sampling.pipeline import PixCellPipeline


def condition_generators(seed: int, names: Sequence[str]) -> list[torch.Generator]:
    """One CPU generator per condition for the prior's starting noise. Seeded apart from the image noise of the
    same name (`name_seed(seed, name)`), so the two draws are independent."""
    return [torch.Generator().manual_seed(name_seed(seed, f"prior:{name}")) for name in names]


class PriorSource(ConditionSource):
    """`n_images` conditions sampled from a UNI prior (optionally for one label), in fixed chunks of `chunk`.

    A condition depends only on the prior, the label, the guidance, the flow steps, the seed and its name: chunks
    are fixed by position, and each row starts from its own generator. The chunk last drawn is kept, so the
    runner's batches (in order) draw each chunk once. Loading runs the prior on `prior`'s device, so the runner
    must load in the main process (workers = 0).
    """

    kind = "prior"

    def __init__(
        self,
        tokens_side: int,
        tile: int,
        channels: int,
        prior: UNIPrior,
        n_images: int,
        prior_ref: str,  # what the manifest names as the prior (a path hash or hub id)
        label: str | None = None,
        guidance: float = 1.0,
        steps: int = DEFAULT_FLOW_STEPS,
        seed: int = 0,
        chunk: int = 64,
    ):
        super().__init__(tokens_side, tile, channels)
        check_prior_fits(prior, tokens_side * tokens_side, channels)
        if n_images < 1:
            raise ValueError(f"prior conditions: n_images {n_images}, expected >= 1")
        if steps < 1:
            raise ValueError(f"prior conditions: flow steps {steps}, expected >= 1")
        prior.label_ids(label, 1)  # an unknown label fails here, before any sampling
        self.prior, self.n_images, self.prior_ref = prior, n_images, prior_ref
        self.label, self.guidance, self.steps, self.seed, self.chunk = (
            label,
            float(guidance),
            steps,
            seed,
            chunk,
        )
        self.stem = f"prior_{label}" if label else "prior"
        self._cached: tuple[int, np.ndarray] | None = None

    def describe(self) -> str:
        return f"UNI prior {self.prior_ref} ({self.label or 'no label'}, {self.n_images} conditions)"

    def run_info(self) -> dict:
        return {
            "prior": self.prior_ref,
            "prior_label": self.label,
            "prior_guidance": self.guidance,
            "prior_steps": self.steps,
        }

    def name(self, i: int) -> str:
        return f"{self.stem}_{i:06d}"

    def specs(self, skipped: list[str] | None = None) -> list[Spec]:
        m = self.m
        return [
            Spec(
                self.name(i),
                str(i),
                0,
                0,
                m,
                m,
                False,
                {
                    "type": "prior",
                    "prior": self.prior_ref,
                    "label": self.label,
                    "guidance": self.guidance,
                    "steps": self.steps,
                    "prior_seed": name_seed(self.seed, f"prior:{self.name(i)}"),
                },
            )
            for i in range(self.n_images)
        ]

    def _draw_chunk(self, k: int) -> np.ndarray:
        names = [self.name(i) for i in range(k * self.chunk, min((k + 1) * self.chunk, self.n_images))]
        tokens = self.prior.sample(
            len(names),
            self.label,
            self.guidance,
            self.steps,
            generator=condition_generators(self.seed, names),
        )
        return tokens.cpu().numpy()  # (n, T, C)

    def load(self, spec: Spec) -> Loaded:
        i = int(spec.entry)
        k = i // self.chunk
        if self._cached is None or self._cached[0] != k:
            self._cached = (k, self._draw_chunk(k))
        tokens = self._cached[1][i - k * self.chunk]
        return Loaded(tokens.reshape(self.m, self.m, -1), None)


@torch.no_grad()
def sample_images(
    pipe: PixCellPipeline,
    prior: UNIPrior,
    n: int,
    label: str | None = None,
    prior_guidance: float = 1.0,
    prior_steps: int = DEFAULT_FLOW_STEPS,
    generator: torch.Generator | None = None,  # seeds the prior's noise, then the images'
    **pipe_kwargs,  # guidance_scale, num_inference_steps, output_type, ... as for the pipeline
):
    """n images from no reference at all: UNI conditions from the prior (for `label`), then PixCell.

    Returns the pipeline's output; `.conditions` holds the (n, T, C) tokens that were drawn.
    """
    t = pipe.transformer.config
    check_prior_fits(prior, t.caption_num_tokens, t.caption_channels)
    tokens: Tensor = prior.sample(n, label, prior_guidance, prior_steps, generator=generator)
    out = pipe(tokens, generator=generator, **pipe_kwargs)
    out.conditions = tokens
    return out
