"""Python config files (mmengine `Config`, the maintained home of the mmcv format), checked strictly.

A config states an experiment in plain assignments and inherits defaults through `_base_`. Every key it sets must
exist in `configs/_base_/default.py` (nested dicts key by key): a typo is an error, not a silently ignored field.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping
from pathlib import Path

from mmengine.config import Config

from .geometry import UNI_TILE, VAE_FACTOR, resolve_norm
from .model.config_types import check_config_types
from .model.pixcell_transformer import PixCellTransformer2DModel, build_pixcell

# The shipped configs: `configs/` beside the packages, in a checkout and in an installed wheel alike (pyproject.toml
# installs the folder as the top-level `configs` package data beside `diffusion`).
CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
SCHEMA_FILE = CONFIG_ROOT / "_base_" / "default.py"
# Nested dicts whose keys are free-form (their content is checked by the code that reads them).
_OPEN_DICTS = {"model_overrides", "optimizer", "lr_schedule"}


def _check_keys(cfg: dict, schema: dict, where: str, source: str) -> None:
    for key, value in cfg.items():
        if key not in schema:
            raise ValueError(
                f"{source}: unknown config key {where}{key!r} (known: {', '.join(sorted(schema))})"
            )
        if isinstance(schema[key], dict) and not isinstance(value, dict):
            raise ValueError(
                f"{source}: config key {where}{key} must be a dict (got {type(value).__name__} {value!r}); set "
                f"one entry with {where}{key}.NAME=VALUE or a whole dict as dict(k=v)"
            )
        if isinstance(value, dict) and isinstance(schema[key], dict) and key not in _OPEN_DICTS:
            _check_keys(value, schema[key], f"{where}{key}.", source)
        expected = _scalar_type(schema[key])
        if expected is not None and not _fits_scalar(value, expected):
            raise ValueError(
                f"{source}: config key {where}{key} is {value!r} ({type(value).__name__}), expected "
                f"{expected.__name__} (as its default {schema[key]!r})"
            )


def _scalar_type(default: object) -> type | None:
    """The type a key's schema default fixes: bool, int, float, str, or a sequence; None for None (any value)
    and dicts (checked key by key)."""
    for kind in (bool, int, float, str):
        if type(default) is kind:
            return kind
    return list if isinstance(default, list | tuple) else None


def _fits_scalar(value: object, expected: type) -> bool:
    if value is None:  # None means "unset" in many keys (base_model: the trainer's default source)
        return True
    if expected is float:  # an int where a float is expected is fine (lr=1)
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is list:
        return isinstance(value, list | tuple)
    return isinstance(value, expected)


def parse_cfg_options(items: list[str]) -> dict:
    """--cfg-options ['a.b=1', 'c=[1,2]', 'd=text'] -> {'a.b': 1, 'c': [1, 2], 'd': 'text'} (Python literals, else
    strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--cfg-options {item!r}: expected KEY=VALUE")
        out[key] = _literal(value)
    return out


def _literal(text: str):
    """A Python literal, or `dict(k=literal, ...)` as in config files, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        call = ast.parse(text, mode="eval").body
    except SyntaxError:
        return text
    if (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "dict"
        and not call.args
    ):
        try:
            return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg is not None}
        except ValueError:
            pass
    return text


def config_file(name: str | Path) -> Path:
    """A config file: `name` as a path when it exists, else the shipped config of that name
    (`configs/tiny/pixcell_tiny_256.py` or `tiny/pixcell_tiny_256.py`), so an installed package finds its configs
    from any working directory."""
    path = Path(name)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    shipped = CONFIG_ROOT.joinpath(*parts)
    if parts and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"config {name}: no such file (nor a shipped config under {CONFIG_ROOT})")


def shipped_config(name: str) -> Path:
    """A shipped config or schema by its path under `configs/` (`_base_/lora.py`, `tiny/pixcell_tiny_256.py`)."""
    return config_file(Path("configs") / name)


def load_strict_config(path: str | Path, schema_file: str | Path, options: dict | None = None) -> Config:
    """Load `path` (a file, or a shipped config's name: `config_file`), apply `options`, check every key against
    `schema_file` and fill the keys it does not set.

    Shared by every trainer; each has its own schema (this module's SCHEMA_FILE for PixCell itself,
    `configs/_base_/controlnet.py`, `configs/virtual_staining/_base_/*.py`).
    """
    path = config_file(path)
    try:
        cfg = Config.fromfile(str(path))
        if options:
            cfg.merge_from_dict(options)
        schema = Config.fromfile(str(schema_file)).to_dict()
        _check_keys(cfg.to_dict(), schema, "", str(path))
        # Fill keys a config does not set (a config without `_base_` is still complete).
        full = Config(schema)
        full.merge_from_dict(cfg.to_dict())
    except TypeError as err:  # mmengine: a dict where the base (or schema) has another type, or the reverse
        raise ValueError(f"config {path}: {str(err).split('. You may set')[0]}") from None
    return full


def load_config(
    path: str | Path, options: dict | None = None, schema_file: str | Path = SCHEMA_FILE
) -> Config:
    """A PixCell training config (or the ControlNet's, with its `schema_file`): strict keys, the data root
    from $PIXCELL_DATA_ROOT when the config leaves it unset, a resolution made of whole 256 px UNI tiles."""
    full = load_strict_config(path, schema_file, options)
    if "data" in full and full.data.root is None and os.environ.get("PIXCELL_DATA_ROOT"):
        full.data.root = os.environ["PIXCELL_DATA_ROOT"]
    if "vae_shift" in full:
        full.vae_shift, full.vae_scale = resolve_latent_norm(full)
    if full.resolution % UNI_TILE:
        raise ValueError(
            f"{path}: resolution {full.resolution} is not a multiple of {UNI_TILE} (one UNI token per tile)"
        )
    return full


def resolve_latent_norm(cfg: Config) -> tuple[float, float]:
    """The run's (vae_shift, vae_scale): as configured, else as recorded beside the features, else SD3.5's; a
    configured pair that the features contradict is a one-line ValueError (diffusion.geometry.resolve_norm)."""
    from .data.features import PACKED_DIRNAME, recorded_latent_norm
    from .data.shards import SHARDS_DIRNAME

    d = cfg.get("data", {})
    recorded, where = None, "config"
    if d.get("root"):
        fmt = d.get("feature_format", "npy")
        subfolder = {"packed": PACKED_DIRNAME, "shards": SHARDS_DIRNAME}.get(fmt)
        default = Path(d["root"]) / subfolder if subfolder else Path(d["root"])
        root = Path(d["features_root"]) if d.get("features_root") else default
        if root.is_dir():
            recorded, where = recorded_latent_norm(root, fmt)
    return resolve_norm((cfg.vae_shift, cfg.vae_scale), recorded, where)


def build_model_from_config(cfg: Config) -> PixCellTransformer2DModel:
    """The transformer a config trains; checks that its size and token count fit `resolution`."""
    # model_overrides is an open dict: the model's constructor types are its schema
    check_config_types(PixCellTransformer2DModel, dict(cfg.model_overrides), "config model_overrides")
    model = build_pixcell(cfg.model, **dict(cfg.model_overrides))
    c = model.config
    px = c.sample_size * VAE_FACTOR
    tokens = (cfg.resolution // UNI_TILE) ** 2
    if px != cfg.resolution or c.caption_num_tokens != tokens:
        raise ValueError(
            f"config: model {cfg.model} works at {px} px with {c.caption_num_tokens} UNI token(s), but resolution "
            f"{cfg.resolution} needs {cfg.resolution} px and {tokens} token(s)"
        )
    return model


#################################################################################
#                      What may change when a run resumes                       #
#################################################################################

# Keys (or dotted prefixes) a resumed run may change: where data is read from, how long to train, how often
# to log/save/validate, the learning rate (applied to the optimizer and LR schedule) and the safety limits.
# Anything else (model, data selection, batch size, seeds, precision, schedule shape) would make the resumed run
# a different experiment than its checkpoints: it is refused with one line.
RESUME_CHANGEABLE = (
    "optimizer.lr",
    "max_steps",
    "num_epochs",
    "save_every_steps",
    "keep_last",
    "log_every_steps",
    "report_to",
    "validation",
    "max_nonfinite_steps",
    "gradient_clip",
    "data.root",
    "data.index_file",
    "data.features_root",
    "data.num_workers",
    "data.max_failure_rate",
    # how the same run is laid out on other hardware (a sharded checkpoint loads on any sharding)
    "fsdp.strategy",
    "fsdp.reshard_after_forward",
    # passed on to the restore, which refuses a change of the checkpoint format in one line of its own
    "fsdp.enabled",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(saved_text: str, config: Mapping[str, object]) -> dict[str, tuple]:
    """{dotted key: (value in the checkpoint's config, value now)} for every key that differs (`config`: the
    resolved config as a dict, `Config.to_dict()`)."""
    old = _flat(Config.fromstring(saved_text, ".py").to_dict())
    new = _flat(dict(config))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def check_resume_changes(
    saved_text: str, config: Mapping[str, object], checkpoint: str | Path, also: tuple[str, ...] = ()
) -> dict[str, tuple]:
    """The config changes of a resumed run, when every one may change (RESUME_CHANGEABLE, plus `also`); else one
    ValueError naming every key that may not."""
    changes = config_changes(saved_text, config)
    refused = {
        key: change
        for key, change in changes.items()
        if not any(key == k or key.startswith(k + ".") for k in (*RESUME_CHANGEABLE, *also))
    }
    if len(refused) == 1:
        ((key, (old, new)),) = refused.items()
        what = f"config key {key} is {old!r} there and {new!r} now, and cannot"
    elif refused:  # a changed model: every key at once (num_layers and its width, say), not one per attempt
        keys = ", ".join(f"{key} ({old!r} there, {new!r} now)" for key, (old, new) in refused.items())
        what = f"config keys {keys} cannot"
    if refused:
        raise ValueError(
            f"resume from {checkpoint}: {what} change when a run resumes (changeable: optimizer.lr, max_steps, "
            "logging/saving/validation intervals, data locations); use another --work-dir, with --load-from to "
            "start from these weights"
        )
    return changes
