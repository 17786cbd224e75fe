"""Pathology encoders as feature extractors for the metrics: UNI2-h, H-optimus-0, Virchow2, any timm model.

An encoder is named by a spec, on the command line `--encoder NAME=SOURCE[,option=value...]`:

    uni2                                        the preset (hf-hub:MahmoodLab/UNI2-h)
    uni2=/weights/uni2h/pytorch_model.bin       the preset's architecture and preprocessing, local weights
    hoptimus0=/weights/H-optimus-0              a folder as downloaded from the Hub (config.json + weights)
    mine=/ckpt/vit.pth,arch=vit_large_patch16_224,size=224,mean=0.5/0.5/0.5,std=0.5/0.5/0.5,pool=cls
    dino=vit_small_patch14_dinov2.lvd142m,size=224      a timm model name with timm's pretrained weights

SOURCE is a `hf-hub:` id, a folder (timm layout: `config.json` with `architecture`, `model_args`,
`pretrained_cfg`, beside `model.safetensors` or `pytorch_model.bin`), a weights file (needs `arch=` unless the
name is a preset), or a timm model name. Options: `arch=` timm architecture, `size=` input side in px,
`mean=`/`std=` three values joined by `/`, `pool=` how tokens become one vector (`model`: the model's own
output, which must be (B, D); `cls`: the class token; `mean`: the mean of the patch tokens; `cls+mean`: both,
concatenated, as Virchow2 recommends). Any other `key=value` is passed to `timm.create_model` (values parsed
as JSON when they can be: `global_pool=""`, `reg_tokens=4`, `dynamic_img_size=true`).

Preprocessing, for every encoder: the whole image is resized to `size` x `size` (bilinear, antialiased) and
normalized with `mean`/`std`; one vector per image. Precedence: spec options, then the preset, then the
folder's `pretrained_cfg`, then timm's pretrained config for the architecture.

Stand-ins for tests and the CPU demo (`diffusion.standins`: `build_tiny_timm_encoder`, `build_tiny_uni`) are
saved in the same layout and loaded through `load_feature_encoder` like the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from diffusion.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNI2H_ARCH,
    UNI2H_HUB_ID,
    UNIEncoder,
    load_uni,
    resolve_timm_layers,
)
from diffusion.metrics.features import FeatureExtractor, to_uint8_chw, weights_fingerprint

POOLS = ("model", "cls", "mean", "cls+mean")
_SPEC_KEYS = ("arch", "size", "mean", "std", "pool")


@dataclass(frozen=True)
class EncoderSpec:
    """What to load and how to preprocess for it. `None` fields are resolved at load time (see module doc)."""

    name: str  # metric suffix: fd_<name>, kid_<name>, cos_<name>
    source: str  # hf-hub id, folder, weights file or timm model name
    arch: str | None = None  # timm architecture, needed for a bare weights file
    model_args: Mapping = field(default_factory=dict)  # passed to timm.create_model on every load
    arch_args: Mapping = field(default_factory=dict)  # only when no config.json says it (bare weights file)
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    pool: str = "model"
    loader: str = "timm"  # "uni": diffusion.encoders.load_uni (the loader PixCell's conditioning uses)


# Published encoders (model cards on the Hub). `model_args` are what each card passes to timm.create_model;
# `arch_args` complete the architecture when only a weights file is given.
FEATURE_ENCODERS: dict[str, EncoderSpec] = {
    "uni2": EncoderSpec(
        name="uni2",
        source=UNI2H_HUB_ID,
        arch=UNI2H_ARCH,
        input_size=224,
        mean=IMAGENET_MEAN,  # timm's default config says 0.5; the published PixCell tools use ImageNet stats
        std=IMAGENET_STD,
        pool="model",  # class token (timm global_pool='token')
        loader="uni",
    ),
    "hoptimus0": EncoderSpec(
        name="hoptimus0",
        source="hf-hub:bioptimus/H-optimus-0",
        arch="vit_giant_patch14_reg4_dinov2",
        model_args={"init_values": 1e-5, "dynamic_img_size": False},
        arch_args={"img_size": 224, "num_classes": 0},
        input_size=224,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        pool="model",
    ),
    "virchow2": EncoderSpec(
        name="virchow2",
        source="hf-hub:paige-ai/Virchow2",
        arch="vit_huge_patch14_224",
        model_args={"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
        arch_args={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "global_pool": "",
            "dynamic_img_size": True,
        },
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pool="cls+mean",  # the model card's embedding: class token + mean of patch tokens (2560-d)
    ),
}


#################################################################################
#                                  Spec parsing                                 #
#################################################################################


def parse_encoder_spec(text: str) -> EncoderSpec:
    """`NAME`, `NAME=SOURCE` or `NAME=SOURCE,opt=value,...` -> EncoderSpec (see the module doc)."""
    name, _, rest = text.partition("=")
    name = name.strip()
    if not name.isidentifier():
        raise ValueError(
            f"--encoder {text!r}: expected NAME=SOURCE[,opt=value...] with NAME like uni2 or my_vit"
        )
    if not rest:
        if name not in FEATURE_ENCODERS:
            raise ValueError(
                f"--encoder {name}: not a preset ({', '.join(FEATURE_ENCODERS)}); give a source: {name}=SOURCE"
            )
        return FEATURE_ENCODERS[name]
    source, *options = rest.split(",")
    if not source:
        raise ValueError(f"--encoder {text!r}: empty SOURCE")
    spec = (
        replace(FEATURE_ENCODERS[name], source=source)
        if name in FEATURE_ENCODERS
        else EncoderSpec(name, source)
    )
    updates: dict = {}
    model_args = dict(spec.model_args)
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ValueError(f"--encoder {name}: option {option!r} is not key=value")
        if key == "arch":
            updates["arch"] = value
        elif key == "size":
            updates["input_size"] = _positive_int(value, name, key)
        elif key in ("mean", "std"):
            updates[key] = _triple(value, name, key)
        elif key == "pool":
            if value not in POOLS:
                raise ValueError(f"--encoder {name}: pool={value!r}, expected one of {', '.join(POOLS)}")
            updates["pool"] = value
        else:
            model_args[key] = _json_or_str(value)
    return replace(spec, model_args=model_args, **updates)


def _positive_int(value: str, name: str, key: str) -> int:
    try:
        out = int(value)
    except ValueError:
        out = 0
    if out <= 0:
        raise ValueError(f"--encoder {name}: {key}={value!r}, expected a positive integer")
    return out


def _triple(value: str, name: str, key: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value.split("/"))
    except ValueError:
        out = ()
    if len(out) != 3:
        raise ValueError(f"--encoder {name}: {key}={value!r}, expected three numbers like 0.485/0.456/0.406")
    return out  # type: ignore[return-value]


def _json_or_str(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


#################################################################################
#                                    Loading                                    #
#################################################################################


class PooledEncoder(torch.nn.Module):
    """A timm model whose output is reduced to one vector per image by `pool` (see POOLS)."""

    def __init__(self, model: torch.nn.Module, pool: str = "model"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: expected one of {', '.join(POOLS)}")
        self.model = model
        self.pool = pool
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.num_features = model.num_features * (2 if pool == "cls+mean" else 1)
        if pool in ("cls", "cls+mean") and self.num_prefix_tokens < 1:
            raise ValueError(
                f"pool={pool}: {type(model).__name__} has no class token (use pool=mean or model)"
            )

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalized -> (B, num_features)."""
        if self.pool == "model":
            out = self.model(x)
            if out.ndim != 2:
                raise ValueError(
                    f"{type(self.model).__name__} returns {tuple(out.shape)} (tokens?): choose pool=cls, mean "
                    "or cls+mean in the encoder spec"
                )
            return out
        tokens = self.model.forward_features(x)
        if tokens.ndim == 4:  # CNN feature map (B, C, h, w): patch tokens are its pixels
            tokens = tokens.flatten(2).transpose(1, 2)
        patches = tokens[:, self.num_prefix_tokens :].mean(dim=1)  # (B, D), registers excluded
        if self.pool == "mean":
            return patches
        if self.pool == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], patches], dim=1)


def load_feature_encoder(
    spec: EncoderSpec | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FeatureExtractor:
    """Load an encoder from its spec (or spec string) as a FeatureExtractor giving (B, D) float32 features."""
    if isinstance(spec, str):
        spec = parse_encoder_spec(spec)
    device = torch.device(device)
    folder_cfg: dict = {}
    if spec.loader == "uni":
        try:
            model = load_uni(spec.source).model
        except (RuntimeError, FileNotFoundError, ValueError) as err:
            flag = f"--encoder {spec.name}=PATH"  # load_uni names its source parameter `uni`
            msg = str(err).replace("`uni`", flag) if "`uni`" in str(err) else f"{err} ({flag})"
            raise type(err)(f"encoder {spec.name}: {msg}") from None
        arch = spec.arch
    else:
        model, arch, folder_cfg = _load_timm(spec)
    timm_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    input_size = (
        spec.input_size or _side(folder_cfg.get("input_size")) or _side(timm_cfg.get("input_size")) or 224
    )
    mean = tuple(spec.mean or folder_cfg.get("mean") or timm_cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(spec.std or folder_cfg.get("std") or timm_cfg.get("std") or IMAGENET_STD)
    encoder = UNIEncoder(PooledEncoder(model, spec.pool), input_size=input_size, mean=mean, std=std)
    encoder = encoder.to(device=device, dtype=dtype)
    encoder.mean, encoder.std = encoder.mean.float(), encoder.std.float()  # normalization stays in fp32
    info = {
        "name": spec.name,
        "source": spec.source,
        "arch": arch,
        "input_size": input_size,
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
        "resize": "bilinear-antialias",
        "pool": spec.pool,
        "dtype": str(dtype).removeprefix("torch."),
        "dim": encoder.embed_dim,
        "weights": weights_fingerprint(model),
    }
    return FeatureExtractor(spec.name, encoder, to_uint8_chw, encoder.embed_dim, device, info)


def _side(input_size: Sequence[int] | None) -> int | None:
    return int(input_size[-1]) if input_size else None


def _load_timm(spec: EncoderSpec) -> tuple[torch.nn.Module, str, dict]:
    """-> (model in eval mode, architecture name, the folder's pretrained_cfg or {})."""
    import timm

    hint = f"--encoder {spec.name}=SOURCE"
    source = spec.source
    path = Path(source).expanduser()
    if source.startswith("hf-hub:"):
        return _create(spec, source, source, pretrained=True, **spec.model_args), source, {}
    if path.is_dir():
        cfg_file = path / "config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        arch = cfg.get("architecture") or spec.arch
        if arch is None:
            raise ValueError(f"{hint}: {path} has no config.json naming the architecture; add arch=TIMM_NAME")
        weights = next(
            (path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None
        )
        if weights is None:
            raise FileNotFoundError(f"{hint}: {path} has no model.safetensors or pytorch_model.bin")
        args = {**(spec.arch_args if not cfg else {}), **cfg.get("model_args", {}), **spec.model_args}
        return _create(spec, arch, weights, file=weights, **args), arch, cfg.get("pretrained_cfg", {})
    if path.is_file():
        if spec.arch is None:
            raise ValueError(f"{hint}: {path} is a bare weights file; add arch=TIMM_NAME (and size/mean/std)")
        args = {**spec.arch_args, **spec.model_args}
        return _create(spec, spec.arch, path, file=path, **args), spec.arch, {}
    if "/" in source or source.startswith((".", "~")) or not timm.is_model(source.split(".")[0]):
        raise FileNotFoundError(f"{hint}: {source!r} is not a file, folder, hf-hub: id or timm model name")
    return _create(spec, source, source, pretrained=True, **spec.model_args), source, {}


def _create(
    spec: EncoderSpec, arch: str, where: str | Path, file: Path | None = None, **kwargs
) -> torch.nn.Module:
    """timm.create_model with one-line errors. Local weights go through timm's own pretrained loading
    (`pretrained_cfg_overlay=dict(file=...)`) so its checkpoint filters and strict key check apply."""
    import timm

    kwargs = resolve_timm_layers(kwargs)
    if file is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(file)})
    try:
        return timm.create_model(arch, **kwargs).eval()
    except Exception as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        if file is None and arch.startswith("hf-hub:"):
            raise RuntimeError(
                f"encoder {spec.name}: cannot load {arch} ({type(err).__name__}): request access on the Hub and "
                f"log in, or download it and pass --encoder {spec.name}=LOCAL_FOLDER"
            ) from None
        raise ValueError(
            f"encoder {spec.name}: cannot build {arch} from {where} ({type(err).__name__}: {first})"
        ) from None
