"""Evaluate a folder of synthetic images against a folder of real ones, in several feature spaces.

Metrics (names as on the command line and in metrics.json):
    fid, kid         Inception-v3 (clean-fid, mode='clean') Frechet distance and KID
    fd_NAME          Frechet distance of the Gaussians fitted to encoder NAME's features of the two folders
    kid_NAME         KID in encoder NAME's feature space
    cos_NAME         conditional fidelity: mean cosine similarity between each real image's embedding and its
                     synthetic twin's (same file name); the distribution is reported too
    morphology       no encoder: Frechet distance of standardised stain / nuclei / sharpness features, with a
                     bootstrap interval and per-feature medians and Wasserstein distances
                     (`diffusion.metrics.morphology`); the default when no encoder weights are given
NAME is an encoder preset (uni2, hoptimus0, virchow2) or one defined by a spec (`diffusion.metrics.encoders`).
"""

from __future__ import annotations

import importlib.metadata
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffusion.geometry import DTYPES
from diffusion.metrics.cache import FeatureCache, default_feature_cache_dir
from diffusion.metrics.distances import (
    frechet_distance_from_features,
    kernel_distance,
    paired_cosine,
    summarize_cosine,
)
from diffusion.metrics.encoders import FEATURE_ENCODERS, EncoderSpec, load_feature_encoder, parse_encoder_spec
from diffusion.metrics.features import FeatureExtractor, embed_images
from diffusion.metrics.images import ImageFolder, check_paired, content_hash, image_sizes, list_images
from diffusion.writable import check_writable

DEFAULT_ENCODERS = ("uni2",)
MORPHOLOGY = "morphology"  # the encoder-free metric (diffusion.metrics.morphology)
KINDS = ("fd", "kid", "cos")
CACHE_MODES = ("real", "all", "none")


def parse_metric(name: str) -> tuple[str, str]:
    """'fid' -> ('fd', 'inception'), 'kid' -> ('kid', 'inception'), 'cos_uni2' -> ('cos', 'uni2')."""
    aliases = {"fid": ("fd", "inception"), "kid": ("kid", "inception")}
    if name in aliases:
        return aliases[name]
    match = re.fullmatch(r"(fd|kid|cos)_([A-Za-z_][A-Za-z0-9_]*)", name)
    if not match:
        raise ValueError(f"--metrics: {name!r} is not fid, kid, fd_NAME, kid_NAME or cos_NAME")
    return match.group(1), match.group(2)


def metric_name(kind: str, encoder: str) -> str:
    if encoder == "inception" and kind in ("fd", "kid"):
        return "fid" if kind == "fd" else "kid"
    return f"{kind}_{encoder}"


def resolve_plan(
    metrics: Sequence[str] | None,
    encoders: Sequence[str] | None,
) -> tuple[list[str], dict[str, EncoderSpec | None]]:
    """Which metrics to compute and with which encoders (None stands for Inception).

    encoders: spec strings (`uni2`, `uni2=/path`, `mine=/dir,pool=cls`). metrics default to fid, kid and
    fd_/cos_ for every encoder given (uni2 when none is); given explicitly, they are exactly what is computed.
    """
    specs: dict[str, EncoderSpec] = {}
    for text in encoders if encoders is not None else DEFAULT_ENCODERS:
        spec = parse_encoder_spec(text)
        if spec.name == "inception":
            raise ValueError(
                "--encoder inception: Inception is configured with --inception PATH, not --encoder"
            )
        specs[spec.name] = spec
    if metrics is None:
        metrics = ["fid", "kid"] + [f"{kind}_{name}" for name in specs for kind in ("fd", "cos")]
    names: list[str] = []
    needed: dict[str, EncoderSpec | None] = {}
    for metric in metrics:
        kind, enc = parse_metric(metric.strip())
        name = metric_name(kind, enc)
        if name in names:
            continue
        names.append(name)
        if enc == "inception":
            needed["inception"] = None
        elif enc in specs:
            needed[enc] = specs[enc]
        elif enc in FEATURE_ENCODERS:
            needed[enc] = FEATURE_ENCODERS[enc]
        else:
            raise ValueError(
                f"--metrics {metric}: no encoder {enc!r} (presets: {', '.join(FEATURE_ENCODERS)}; "
                f"define others with --encoder {enc}=SOURCE)"
            )
    if not names:
        raise ValueError("--metrics: nothing to compute")
    return names, needed


def evaluate(
    real: str | Path,
    syn: str | Path,
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    encoders: Sequence[str] | None = None,
    inception: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str = "fp32",
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    cache: str = "real",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Compute the metrics of SYN against REAL; write metrics.json, report.md, report.png, pairs.csv to `out`.

    Returns the report as a dict: `result["metrics"]` maps each metric name to a float (cos_NAME: the mean),
    `result["cosine"][NAME]` holds the distribution of per-pair cosines, `result["encoders"]` what each encoder
    was (source, preprocessing, feature size), `result["real"]`/`["syn"]` the folders (count, content hash).
    cache: "real" caches REAL's features only (the reference set, reused across generators), "all" both,
    "none" nothing. Errors (missing folders, no images, unpaired names, broken images, missing weights) are
    raised as ValueError / FileNotFoundError / RuntimeError with a one-line message.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if cache not in CACHE_MODES:
        raise ValueError(f"--cache {cache}: expected one of {', '.join(CACHE_MODES)}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"--batch-size {batch_size} / --num-workers {num_workers}: expected >= 1 / >= 0")
    # Where the report and the cache go must be writable now, not after every feature has been computed.
    if out is not None:
        check_writable(out, "--out")
    if cache != "none":
        check_writable(cache_dir or default_feature_cache_dir(), "--cache-dir")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    want_morphology = metrics is not None and MORPHOLOGY in metrics
    if want_morphology:
        metrics = [m for m in metrics if m != MORPHOLOGY]
    names, needed = ([], {}) if want_morphology and not metrics else resolve_plan(metrics, encoders)

    real_folder, syn_folder = list_images(real, "REAL"), list_images(syn, "SYN")
    paired = [n for n in names if n.startswith("cos_")]
    if paired:
        check_paired(real_folder, syn_folder, paired[0])
    for folder in (real_folder, syn_folder):
        if len(folder) < 2 and any(not n.startswith("cos_") for n in names):
            raise ValueError(
                f"{folder.role} {folder.root}: FD and KID need at least 2 images, found {len(folder)}"
            )
    if "inception" in needed:  # fail before hours of embedding, not after
        from diffusion.metrics.inception import find_inception

        inception = find_inception(inception)
    for spec in needed.values():
        if spec is not None and _looks_local(spec.source) and not Path(spec.source).expanduser().exists():
            raise FileNotFoundError(f"--encoder {spec.name}={spec.source}: no such file or folder")
    hashes = {f.role: content_hash(f, progress) for f in (real_folder, syn_folder)}
    sizes = {f.role: image_sizes(f) for f in (real_folder, syn_folder)}
    feature_cache = FeatureCache(cache_dir or default_feature_cache_dir())

    results: dict[str, float] = {}
    cosine: dict[str, dict] = {}
    pair_cos: dict[str, list[float]] = {}
    enc_info: dict[str, dict] = {}
    cache_hits: dict[str, dict[str, bool]] = {}
    warnings: list[str] = []
    if set(sizes["REAL"]) != set(
        sizes["SYN"]
    ):  # each encoder resizes to its input: a silent apples-to-oranges
        warnings.append(
            f"REAL images are {', '.join(sizes['REAL'])} px, SYN {', '.join(sizes['SYN'])} px: every metric compares "
            "them after each is resized to the encoder's input size; generate (or crop) at the REAL size"
        )
    for enc, spec in needed.items():
        if spec is None:
            from diffusion.metrics.inception import load_inception

            extractor = load_inception(inception, device)
        else:
            extractor = load_feature_encoder(spec, device, DTYPES[dtype])
        enc_info[enc] = extractor.info
        feats, hits = {}, {}
        for folder in (real_folder, syn_folder):
            feats[folder.role], hits[folder.role] = _features(
                extractor,
                folder,
                hashes[folder.role],
                feature_cache,
                cache,
                batch_size,
                num_workers,
                progress,
            )
        cache_hits[enc] = hits
        del extractor  # free one encoder before the next is loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()

        f_real, f_syn = feats["REAL"], feats["SYN"]
        for name in names:
            kind, enc_name = parse_metric(name)
            if enc_name != enc:
                continue
            if kind == "fd":
                results[name] = frechet_distance_from_features(f_real, f_syn)
                if min(len(f_real), len(f_syn)) <= f_real.shape[1]:
                    warnings.append(
                        f"{name}: {len(f_real)} REAL / {len(f_syn)} SYN images for {f_real.shape[1]}-d features: "
                        "the covariances are rank-deficient and FD is biased upward; compare FDs at equal N only"
                    )
            elif kind == "kid":
                results[name] = kernel_distance(f_real, f_syn, kid_subsets, kid_subset_size, seed)
            else:
                cos = paired_cosine(f_real, f_syn)  # rows align: both folders sorted by the same keys
                summary = summarize_cosine(cos)
                results[name] = summary.mean
                cosine[enc] = summary.to_dict()
                pair_cos[enc] = [float(c) for c in cos]

    morphology = None
    if want_morphology:
        from diffusion.metrics.morphology import compare_morphology, read_folder

        morphology = compare_morphology(
            read_folder(real_folder.files), read_folder(syn_folder.files), seed=seed
        )
        results[MORPHOLOGY] = morphology.frechet.value
        names.append(MORPHOLOGY)
    report = {
        "metrics": {n: results[n] for n in names},
        "cosine": cosine,
        "encoders": enc_info,
        "real": _folder_info(real_folder, hashes["REAL"], sizes["REAL"]),
        "syn": _folder_info(syn_folder, hashes["SYN"], sizes["SYN"]),
        "settings": {
            "device": str(device),
            "dtype": dtype,
            "batch_size": batch_size,
            "seed": seed,
            "kid_subsets": kid_subsets,
            "kid_subset_size": kid_subset_size,
            "cache": cache,
            "cache_dir": str(feature_cache.root),
            "cache_hits": cache_hits,
            "versions": _versions(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "warnings": warnings,
    }
    if morphology is not None:
        report["morphology"] = morphology.to_dict()
    if pair_cos:
        report["pairs"] = {"keys": list(real_folder.keys), "cosine": pair_cos}
    if out is not None:
        from diffusion.metrics.report import write_report

        write_report(report, out)
    return report


def _features(
    extractor: FeatureExtractor,
    folder: ImageFolder,
    folder_hash: str,
    feature_cache: FeatureCache,
    cache: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> tuple[np.ndarray, bool]:
    def compute() -> np.ndarray:
        return embed_images(extractor, folder, batch_size, num_workers, progress)

    if cache == "all" or (cache == "real" and folder.role == "REAL"):
        return feature_cache.get_or_compute(folder, folder_hash, extractor, compute)
    return compute(), False


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or "/" in source and not source.startswith("hf-hub:")


def _folder_info(folder: ImageFolder, folder_hash: str, sizes: dict[str, int]) -> dict:
    return {"path": str(folder.root), "num_images": len(folder), "content_hash": folder_hash, "sizes": sizes}


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "timm", "clean-fid", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
