"""The published Hub snapshots (PixCell-256/1024, the cell-mask ControlNet), read as data, never as code.

A published repository holds `model_index.json` (pipeline class tag), `transformer/` (config, weights and the
remote-code model file `pixcell_transformer_2d.py`), `scheduler/`, `vae/` when present and extra files such as
`test_image.png` (`../shared/formats/hub_api.md`). The Hub pipelines run that Python file (`trust_remote_code`);
we never import or execute anything from a snapshot: the weights load into our own classes and the scheduler
config into our own scheduler choice. A hub id is fetched with `huggingface_hub.snapshot_download`, limited to
the config and weight files (no `.py`, no images).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .samplers import make_scheduler, sampler_name

log = logging.getLogger("pixcell.hub")

# What a pipeline needs from a snapshot; everything else there (remote code, test images) is ignored.
CONFIG_AND_WEIGHTS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.bin", "scheduler/*.json"]
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_hub_id(source: str | Path) -> bool:
    text = str(source)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/"))


def is_snapshot(folder: Path) -> bool:
    """A pipeline snapshot: `model_index.json`, or the ControlNet layout (controlnet/ beside transformer/)."""
    if (folder / "model_index.json").is_file():
        return True
    return (folder / "controlnet" / "config.json").is_file() and (
        folder / "transformer" / "config.json"
    ).is_file()


def resolve_snapshot(source: str | Path, with_vae: bool = True) -> Path | None:
    """The local folder of a pipeline snapshot (a folder, or a hub id fetched without its Python files and
    images); None when `source` is not one (a transformer folder, an original checkpoint, a work dir)."""
    path = Path(source)
    if path.is_dir():
        return path if is_snapshot(path) else None
    if not is_hub_id(source):
        return None
    from huggingface_hub import snapshot_download

    ignore = ["*.py", "*.pyc", "*.png", "*.jpg"] + ([] if with_vae else ["vae/*"])
    try:
        folder = Path(
            snapshot_download(repo_id=str(source), allow_patterns=CONFIG_AND_WEIGHTS, ignore_patterns=ignore)
        )
    except Exception as err:  # offline, gated, no such repo: the transformer loader gives the one-line error
        log.info(
            "%s: no pipeline snapshot fetched (%s); loading its transformer/ only", source, type(err).__name__
        )
        return None
    return folder if is_snapshot(folder) else None


def pipeline_class_tag(folder: Path) -> str:
    """The pipeline class named by `model_index.json` (`"PixCellPipeline"`, or `[module, class]` for remote code)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return ""
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except json.JSONDecodeError:
        raise ValueError(f"{index}: not valid JSON") from None
    return name[-1] if isinstance(name, list) else str(name or "")


def check_pipeline_class(folder: Path, expected: str, others: dict[str, str]) -> None:
    """One line when the snapshot is tagged for another of our pipelines (`others`: tag -> what to use)."""
    tag = pipeline_class_tag(folder)
    if tag in others:
        raise ValueError(f"{folder}: a {tag} snapshot; load it with {others[tag]}, not {expected}")


def saved_scheduler(folder: Path):
    """The snapshot's `scheduler/scheduler_config.json` as one of our samplers with the saved settings, or None.

    The Hub pipeline samples with the scheduler its repository ships, so we do too (`set_sampler` switches).
    One exception, logged: DPM-Solver and SA-Solver would treat a learned variance as its first 3 channels of
    16 (`../shared/ENVIRONMENT.md`, trap 3), so their `variance_type` is dropped; the sampler gets eps only.
    """
    saved = folder / "scheduler" / "scheduler_config.json"
    if not saved.is_file():
        return None
    try:
        cfg = json.loads(saved.read_text())
        name = sampler_name(
            cfg.get("_class_name", ""), cfg
        )  # the config tells DPM-Solver++ from its SDE form
    except json.JSONDecodeError:
        raise ValueError(f"{saved}: not valid JSON") from None
    except ValueError as err:
        raise ValueError(f"{saved}: {err}") from None
    if name in ("dpm-solver", "sde-dpm-solver", "sa-solver") and cfg.get("variance_type"):
        log.info(
            "%s: variance_type %s dropped (this sampler takes the 16 eps channels)",
            saved,
            cfg["variance_type"],
        )
        cfg["variance_type"] = None
    scheduler = type(make_scheduler(name)).from_config(cfg)
    c = scheduler.config
    log.info(
        "scheduler from %s: %s (%s spacing, %s betas %g..%g); set_sampler() overrides it",
        saved,
        name,
        c.get("timestep_spacing"),
        c.get("beta_schedule"),
        c.get("beta_start"),
        c.get("beta_end"),
    )
    return scheduler


def vae_folder(folder: Path | None) -> Path | None:
    """The snapshot's `vae/` when it holds weights."""
    if folder is None or not (folder / "vae" / "config.json").is_file():
        return None
    return folder / "vae" if any(p.suffix in WEIGHT_SUFFIXES for p in (folder / "vae").iterdir()) else None


def register_with_diffusers(*classes: type) -> None:
    """Make `diffusers.DiffusionPipeline.from_pretrained(snapshot)` find our classes by the snapshot's tag.

    diffusers resolves a local snapshot's `_class_name` inside its own module; without this it fails with an
    AttributeError. Our classes then stop it with one line that says to use ours (`refuse_diffusers_loading`),
    before it would import the snapshot's remote-code model file.
    """
    import diffusers

    for cls in classes:
        if not hasattr(diffusers, cls.__name__):
            setattr(diffusers, cls.__name__, cls)


def refuse_diffusers_loading(cls: type) -> ValueError:
    return ValueError(
        f"this is a PixCell snapshot: load it with {cls.__module__}.{cls.__name__}.from_pretrained(path) "
        "(diffusers' DiffusionPipeline would run the snapshot's own Python code)"
    )
