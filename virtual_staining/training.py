"""What the two virtual-staining trainers share beyond `diffusion.training`: their command line, config loading
and the UNI token caches of the data splits.

The flow trainer (`train_flow_mlp.py`) is one linear `main(args)`; the LoRA is trained by the project's LoRA trainer
(`train_scripts/train_lora.py`) with the IHC data of `train_lora.py`. The checkpointing (adapter-only for the LoRA),
EMA, optimizer, LR schedule, resumable sampler, stop signals, run logging and tracking are `diffusion.training`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmengine.config import Config

from diffusion.config import load_strict_config, parse_cfg_options
from diffusion.geometry import DTYPES
from diffusion.training.run import add_resume_args

from .data import Pair, check_target, dataset_pairs
from .embeddings import EmbeddingCache, ensure_embeddings, load_embeddings

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "virtual_staining"


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file, e.g. configs/virtual_staining/flow_mlp_mist.py")
    p.add_argument("--work-dir", required=True, help="run folder: checkpoints, logs, exported weights")
    p.add_argument("--data-root", default=None, help="dataset root (MIST or HER2Match folder)")
    p.add_argument("--stain", default=None, help="MIST: HER2, ER, PR, Ki67 (HER2Match: HER2)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    add_resume_args(p)
    return p.parse_args(argv)


def load_run_config(args: argparse.Namespace, schema: str) -> Config:
    """The config with the command-line overrides, checked against `configs/virtual_staining/_base_/<schema>.py`."""
    options = parse_cfg_options(args.cfg_options)
    for key, value in (("data.root", args.data_root), ("stain", args.stain), ("report_to", args.report_to)):
        if value is not None:
            options[key] = value
    cfg = load_strict_config(args.config, CONFIG_DIR / "_base_" / f"{schema}.py", options)
    check_target(cfg.dataset, cfg.stain)
    if not cfg.data.root:
        raise ValueError("data root not set: pass --data-root (the MIST or HER2Match folder)")
    if cfg.uni_dtype not in DTYPES:
        raise ValueError(f"uni_dtype {cfg.uni_dtype!r}: expected one of {', '.join(DTYPES)}")
    return cfg


def split_embeddings(
    cfg: Config, accelerator, work_dir: Path, split: str
) -> tuple[list[Pair], EmbeddingCache]:
    """The pairs of a split and their UNI token cache: computed once by the main process, then read by all.

    The cache lives in `data.embeddings_dir` (default `<work_dir>/embeddings`); point both trainers of a stain
    at the same folder to embed the images only once.
    """
    d = cfg.data
    pairs = dataset_pairs(cfg.dataset, d.root, split, cfg.stain, d.on_unpaired)
    folder = Path(d.embeddings_dir) if d.embeddings_dir else work_dir / "embeddings"
    path = folder / f"{cfg.dataset}_{cfg.stain}_{split}.safetensors"
    if accelerator.is_main_process:
        ensure_embeddings(
            pairs,
            cfg.uni,
            path,
            device=accelerator.device,
            dtype=DTYPES[cfg.uni_dtype],
            image_size=d.image_size,
            batch_size=cfg.uni_batch_size,
            num_workers=d.num_workers,
            max_failure_rate=d.max_failure_rate,
        )
    accelerator.wait_for_everyone()
    cache = load_embeddings(path)
    by_name = {p.name: p for p in pairs}
    return [by_name[n] for n in cache.names], cache
