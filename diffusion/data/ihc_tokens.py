"""Virtual-staining training data: the UNI2-h tokens of a paired H&E / IHC dataset, cached in one safetensors
file, the run config of the two staining tasks, and the IHC data of the LoRA trainer (`build_ihc_data`).

    he   (N, T, C) float16   tokens of the H&E images (T = 16 for 1024 px: one per 256 px tile, row-major)
    ihc  (N, T, C) float16   tokens of the IHC images
    metadata: names (JSON list, the pair file names in order), encoder, image_size

    python -m virtual_staining.embeddings --dataset MIST --root /data/MIST --stain HER2 --split train \\
        --out work_dirs/mist_her2/embeddings_train.safetensors --uni /weights/uni2h/pytorch_model.bin

Both trainers (train_scripts/train_flow_mlp.py, and train_scripts/train_lora.py with a virtual-staining config)
read this file and write it on first use when it is missing: the flow MLP learns he -> ihc, the LoRA is
conditioned on ihc. The tokens come from `diffusion.encoders.UNIEncoder.embed_grid` (the same preprocessing as every other PixCell feature).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from mmengine.config import Config
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..config import load_strict_config, shipped_config
from ..encoders import UNIEncoder, encode_posterior, latents_to_model, load_uni, load_vae, to_uint8
from ..geometry import DTYPES, UNI_TILE, VAE_FACTOR
from ..model.pixcell_transformer import PixCellTransformer2DModel
from ..sampling.pipeline import PixCellPipeline
from ..sampling.samplers import make_scheduler
from ..training.task import TaskData
from ..training.validation import fixed_noise, sample_column, validation_grid
from .ihc_pairs import Pair, check_target, dataset_pairs, read_image

log = logging.getLogger(__name__)


@dataclass
class EmbeddingCache:
    """Cached tokens of a paired dataset; row i of `he` and `ihc` belongs to `names[i]`."""

    names: list[str]
    he: Tensor  # (N, T, C)
    ihc: Tensor  # (N, T, C)
    meta: dict

    def __len__(self) -> int:
        return len(self.names)

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


class _PairReader(Dataset):
    """Reads both images of a pair; an unreadable pair comes back as its error message (skipped by the loop)."""

    def __init__(self, pairs: list[Pair], size: int):
        self.pairs, self.size = pairs, size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        p = self.pairs[i]
        try:
            return i, read_image(p.he, self.size), read_image(p.ihc, self.size)
        except (ValueError, FileNotFoundError) as err:
            return i, str(err), None


def _collate(
    items: list[tuple[int, Tensor | str, Tensor | None]],
) -> list[tuple[int, Tensor | str, Tensor | None]]:
    return items


@torch.no_grad()
def compute_embeddings(
    pairs: list[Pair],
    uni: UNIEncoder,
    out_path: str | Path,
    image_size: int = 1024,
    batch_size: int = 4,
    num_workers: int = 2,
    max_failure_rate: float = 0.01,
    encoder_name: str = "",
    progress: bool = True,
) -> Path:
    """Embed every pair with `uni.embed_grid` and write the cache (atomically).

    Unreadable or wrongly sized images are skipped with a logged running count; past
    `max_failure_rate * len(pairs)` skips the run stops with a ValueError (nothing is written).
    """
    if image_size % UNI_TILE:
        raise ValueError(
            f"image_size {image_size}: expected a multiple of {UNI_TILE} (one UNI token per {UNI_TILE} px tile)"
        )
    loader = DataLoader(
        _PairReader(pairs, image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    allowed = int(max_failure_rate * len(pairs))
    device = next(uni.parameters()).device
    keep: list[int] = []
    he_out, ihc_out = [], []
    skipped = 0
    for items in tqdm(loader, desc="UNI embeddings", disable=not progress, unit="batch"):
        good = [(i, he, ihc) for i, he, ihc in items if ihc is not None]
        for i, err, _ in (it for it in items if it[2] is None):
            skipped += 1
            log.warning("skipped pair %s (%d skipped so far): %s", pairs[i].name, skipped, err)
            if skipped > allowed:
                raise ValueError(
                    f"{skipped} unreadable pairs, more than max_failure_rate={max_failure_rate} of "
                    f"{len(pairs)}; last: {err}"
                )
        if not good:
            continue
        he = torch.stack([g[1] for g in good]).to(device)
        ihc = torch.stack([g[2] for g in good]).to(device)
        tokens = uni.embed_grid(torch.cat([he, ihc]))  # (2B, T, C)
        he_out.append(tokens[: len(good)].half().cpu())
        ihc_out.append(tokens[len(good) :].half().cpu())
        keep.extend(g[0] for g in good)
    if not keep:
        raise ValueError("no pair could be read")
    state = {"he": torch.cat(he_out).contiguous(), "ihc": torch.cat(ihc_out).contiguous()}
    meta = {
        "format": "pixcell-vs-embeddings",
        "names": json.dumps([pairs[i].name for i in keep]),
        "encoder": encoder_name,
        "image_size": str(image_size),
        "skipped": str(skipped),
    }
    from safetensors.torch import save_file

    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    log.info(
        "wrote %s: %d pairs, tokens %s (%d skipped)", out_path, len(keep), tuple(state["he"].shape), skipped
    )
    return Path(out_path)


def load_embeddings(path: str | Path) -> EmbeddingCache:
    """Read a cache written by `compute_embeddings`; one-line errors for a missing or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding cache {path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "pixcell-vs-embeddings":
                raise ValueError("not written by diffusion.data.ihc_tokens")
            he, ihc = f.get_tensor("he"), f.get_tensor("ihc")
    except Exception as err:
        raise ValueError(f"embedding cache {path}: cannot read it ({err})") from None
    names = json.loads(meta["names"])
    if he.shape != ihc.shape or he.shape[0] != len(names) or he.ndim != 3:
        raise ValueError(
            f"embedding cache {path}: inconsistent shapes he {tuple(he.shape)}, ihc {tuple(ihc.shape)}"
        )
    return EmbeddingCache(names=names, he=he, ihc=ihc, meta=meta)


def ensure_embeddings(
    pairs: list[Pair],
    uni_source: str | Path,
    out_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> EmbeddingCache:
    """Load the cache if it covers exactly these pairs (same names); otherwise compute it with UNI from `uni_source`."""
    out_path = Path(out_path)
    want = [p.name for p in pairs]
    if out_path.is_file():
        cache = load_embeddings(out_path)
        skipped = int(cache.meta.get("skipped", 0))
        # The same pairs, less any that were skipped as unreadable when the cache was written.
        if set(cache.names) <= set(want) and len(cache) + skipped == len(want):
            log.info("using cached embeddings %s (%d pairs)", out_path, len(cache))
            return cache
        log.info("%s: covers other pairs than this split; recomputing", out_path)
    uni = load_uni(uni_source, device=device).to(dtype)
    compute_embeddings(pairs, uni, out_path, encoder_name=str(uni_source), **kwargs)
    return load_embeddings(out_path)


#################################################################################
#                  The run config and token caches of a staining task            #
#################################################################################


def load_staining_config(path: str | Path, options: dict, schema: str) -> Config:
    """A virtual-staining config with its overrides, checked against `configs/virtual_staining/_base_/<schema>.py`
    (schema "flow_mlp" or "lora"), its target and its data root."""
    cfg = load_strict_config(path, shipped_config(f"virtual_staining/_base_/{schema}.py"), options)
    check_target(cfg.dataset, cfg.stain)
    if not cfg.data.root:
        raise ValueError("data root not set: pass --data-root (the MIST or HER2Match folder)")
    if cfg.uni_dtype not in DTYPES:
        raise ValueError(f"uni_dtype {cfg.uni_dtype!r}: expected one of {', '.join(DTYPES)}")
    return cfg


@dataclass(frozen=True)
class TokenSplit:
    """Where the UNI tokens of one split of a staining dataset come from and go to (from the run's config)."""

    dataset: str  # MIST or HER2Match
    stain: str
    root: Path
    split: str
    uni: str  # UNI2-h source: hub id, local folder or weights file
    uni_dtype: str  # a key of diffusion.geometry.DTYPES
    image_size: int
    cache_dir: Path  # data.embeddings_dir, default <work_dir>/embeddings
    on_unpaired: str = "error"
    batch_size: int = 4
    num_workers: int = 2
    max_failure_rate: float = 0.01

    @classmethod
    def from_config(cls, cfg: Config, work_dir: Path, split: str) -> TokenSplit:
        d = cfg.data
        return cls(
            dataset=cfg.dataset,
            stain=cfg.stain,
            root=Path(d.root),
            split=split,
            uni=str(cfg.uni),
            uni_dtype=cfg.uni_dtype,
            image_size=d.image_size,
            cache_dir=Path(d.embeddings_dir) if d.embeddings_dir else work_dir / "embeddings",
            on_unpaired=d.on_unpaired,
            batch_size=cfg.uni_batch_size,
            num_workers=d.num_workers,
            max_failure_rate=d.max_failure_rate,
        )


def split_embeddings(split: TokenSplit, accelerator: Accelerator) -> tuple[list[Pair], EmbeddingCache]:
    """The pairs of a split and their UNI token cache: computed once by the main process, then read by all.

    Point both trainers of a stain at the same `cache_dir` (data.embeddings_dir) to embed the images only once.
    """
    s = split
    pairs = dataset_pairs(s.dataset, s.root, s.split, s.stain, s.on_unpaired)
    path = s.cache_dir / f"{s.dataset}_{s.stain}_{s.split}.safetensors"
    if accelerator.is_main_process:
        ensure_embeddings(
            pairs,
            s.uni,
            path,
            device=accelerator.device,
            dtype=DTYPES[s.uni_dtype],
            image_size=s.image_size,
            batch_size=s.batch_size,
            num_workers=s.num_workers,
            max_failure_rate=s.max_failure_rate,
        )
    accelerator.wait_for_everyone()
    cache = load_embeddings(path)
    by_name = {p.name: p for p in pairs}
    return [by_name[n] for n in cache.names], cache


#################################################################################
#                    The IHC data of the LoRA trainer                            #
#################################################################################


class IHCWithTokens(Dataset):
    """{'image': (3, S, S) IHC image in [0, 1], 'uni': (T, C) its UNI tokens}; None for an unreadable image."""

    def __init__(self, paths: list[Path], tokens: Tensor, size: int):
        self.paths, self.tokens, self.size = paths, tokens, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict | None:
        try:
            image = read_image(self.paths[i], self.size)
        except (ValueError, FileNotFoundError) as err:  # counted by the loop, which stops past a threshold
            log.warning("skipped %s", err)
            return None
        return {"image": image, "uni": self.tokens[i].float()}


def collate_ihc(items: list[dict | None]) -> dict:
    good = [x for x in items if x is not None]
    out = {"skipped": len(items) - len(good)}
    if good:
        out["image"] = torch.stack([x["image"] for x in good])
        out["uni"] = torch.stack([x["uni"] for x in good])
    return out


@dataclass(frozen=True)
class IHCDataSettings:
    """The IHC task's data settings (from a virtual-staining LoRA config, at the trainer's entry point)."""

    train: TokenSplit
    val: TokenSplit | None  # None: validate on the last training images, never trained on
    resize_to_model: bool  # accept images of another size than the model's, resized
    vae: str  # SD3.5 VAE source: hub id or local folder
    validation_every: int  # steps between validation grids (0: none)
    validation_images: int
    guidance_scale: float
    num_inference_steps: int
    seed: int

    @classmethod
    def from_config(cls, cfg: Config, work_dir: Path) -> IHCDataSettings:
        v = cfg.validation
        return cls(
            train=TokenSplit.from_config(cfg, work_dir, cfg.data.train_split),
            val=TokenSplit.from_config(cfg, work_dir, cfg.data.val_split) if cfg.data.val_split else None,
            resize_to_model=bool(cfg.data.resize_to_model),
            vae=str(cfg.vae),
            validation_every=v.every_steps,
            validation_images=v.num_images,
            guidance_scale=v.guidance_scale,
            num_inference_steps=v.num_inference_steps,
            seed=cfg.seed,
        )


def build_ihc_data(
    settings: IHCDataSettings, model: PixCellTransformer2DModel, model_name: str, accelerator: Accelerator
) -> TaskData:
    """The LoRA trainer's data for a virtual-staining config: IHC images (VAE-encoded on the fly, a fresh
    posterior sample every step, as the original trainer did) with their cached UNI tokens, and the validation
    grid [real IHC | sample from its own tokens]."""
    s, c, device = settings, model.config, accelerator.device
    size = s.train.image_size
    model_px = c.sample_size * VAE_FACTOR
    if size != model_px and not s.resize_to_model:
        raise ValueError(
            f"data.image_size {size} px, but {model_name} generates {model_px} px images "
            "(use images of the model's size, or data.resize_to_model=True)"
        )
    if (size // UNI_TILE) ** 2 != c.caption_num_tokens:
        raise ValueError(
            f"data.image_size {size} px gives {(size // UNI_TILE) ** 2} UNI tokens, but "
            f"{model_name} takes {c.caption_num_tokens}"
        )
    vae = load_vae(s.vae).to(device).eval().requires_grad_(False)
    pairs, train = split_embeddings(s.train, accelerator)
    if train.ihc.shape[1:] != (c.caption_num_tokens, c.caption_channels):
        raise ValueError(
            f"UNI tokens of shape {tuple(train.ihc.shape[1:])} per image, but {model_name} takes "
            f"({c.caption_num_tokens}, {c.caption_channels}) (check uni and data.image_size)"
        )
    dataset = IHCWithTokens([p.ihc for p in pairs], train.ihc, size)

    def inputs(batch: dict, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        ihc = batch["image"].to(device)
        if ihc.shape[-1] != model_px:  # data.resize_to_model (checked above)
            ihc = F.interpolate(ihc, size=(model_px, model_px), mode="bilinear", antialias=True)
        with torch.no_grad():
            mean, std = encode_posterior(vae, ihc)
            x0 = latents_to_model(mean + std * torch.randn(mean.shape, generator=gen, device=device), vae)
        return x0, batch["uni"].to(device)

    data = TaskData(dataset, collate_ihc, inputs, what="IHC images", info={"train_images": len(dataset)})
    if s.validation_every > 0:
        n = s.validation_images
        if s.val is not None:
            val_pairs, val = split_embeddings(s.val, accelerator)
            n = min(n, len(val_pairs))
            val_images = torch.stack([read_image(p.ihc, size) for p in val_pairs[:n]])
            val_tokens = val.ihc[:n].float()
        else:  # the last training images, never trained on
            data.held_out = list(range(len(dataset) - n, len(dataset)))
            val_images = torch.stack([dataset[i]["image"] for i in data.held_out])
            val_tokens = train.ihc[data.held_out].float()

        @torch.no_grad()
        def grid(adapted: torch.nn.Module) -> np.ndarray:
            pipe = PixCellPipeline(transformer=adapted, vae=vae, scheduler=make_scheduler("dpm-solver"))
            noise = fixed_noise(adapted, len(val_tokens), s.seed, device)
            fake = sample_column(pipe, val_tokens.to(device), noise, s.guidance_scale, s.num_inference_steps)
            real = F.interpolate(val_images, size=fake.shape[1:3], mode="bilinear", antialias=True)
            return validation_grid([to_uint8(real), fake])

        data.validation_grid = grid
    return data
