"""Evaluate a UNI prior in UNI space (no images): Frechet distance to held-out real tokens against a fitted Gaussian
and PixCell's null condition, k-NN precision/recall, and the nearest-training distance (memorisation); per label.

    python -m tools.evaluate_prior --prior work_dirs/prior256 --data-root /data/patches \\
        --train-keys tcga_diagnostic_1024 --heldout-keys tcga_heldout_1024 --label-from cancer \\
        --model StonyBrook-CVLab/PixCell-256 --out runs/prior256_eval

Reads the stored UNI features of the index keys (a random `--max-real` of each set), draws `--n-samples` token sets
from the prior (and as many per label), and writes OUT/metrics.json and OUT/report.md. The Frechet distances are
those of tools/evaluate.py (diffusion.metrics.distances), with bootstrap intervals. See docs/prior.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion.atomic import atomic_path
from diffusion.command import resolve_device, run_cli
from diffusion.geometry import UNI_TILE
from diffusion.prior.data import NO_LABEL, UNITokenDataset, read_tokens
from diffusion.prior.evaluation import prior_metrics, token_rows
from diffusion.prior.model import DEFAULT_FLOW_STEPS, UNIPrior, load_prior


def sample_tokens(
    prior: UNIPrior,
    n: int,
    label: str | None,
    guidance: float,
    steps: int,
    seed: int,
    batch: int,
    progress: bool,
) -> np.ndarray:
    """n token sets (n, T, C) in batches, each batch from its own seeded generator."""
    out = []
    for k, start in enumerate(
        tqdm(range(0, n, batch), desc=f"prior {label or ''}".strip(), disable=not progress)
    ):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        out.append(prior.sample(min(batch, n - start), label, guidance, steps, generator=gen).cpu().numpy())
    return np.concatenate(out)


def load_set(args: argparse.Namespace, keys: list[str], prior: UNIPrior, what: str):
    dataset = UNITokenDataset(
        args.data_root,
        index_file=args.index,
        dataset_keys=keys,
        resolution=UNI_TILE * round(prior.num_tokens**0.5),
        parent_size=args.parent_size,
        feature_format=args.features,
        features_root=args.features_root,
        label_from=args.label_from,
    )
    tokens, labels = read_tokens(dataset, args.max_real, args.seed)
    if tokens.shape[-1] != prior.channels:
        raise ValueError(
            f"--{what}-keys: the stored tokens are {tokens.shape[-1]}-d, the prior's {prior.channels}-d"
        )
    names = dataset.label_names
    return tokens.numpy(), [names[i] if i != NO_LABEL else None for i in labels.tolist()]


def write_report(out: Path, results: dict) -> None:
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    cols = [
        "fd",
        "fd_gaussian",
        "fd_gaussian_minus_fd",
        "fd_null",
        "precision",
        "recall",
        "nn_train_ratio",
        "near_copies",
    ]
    lines = [
        "# UNI prior evaluation",
        "",
        f"prior: `{results['prior']}`",
        "",
        "| set | " + " | ".join(cols) + " |",
        "|" + " --- |" * (len(cols) + 1),
    ]
    for name, m in results["sets"].items():
        cells = []
        for c in cols:
            if c not in m:
                cells.append("-")
            elif f"{c}_low" in m:
                cells.append(f"{m[c]:.4g} [{m[c + '_low']:.4g}, {m[c + '_high']:.4g}]")
            else:
                cells.append(f"{m[c]:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "FD: Frechet distance to the held-out tokens, [95% bootstrap interval]; fd_gaussian: a Gaussian fitted",
        "to the training tokens; fd_null: PixCell's null condition; fd_gaussian_minus_fd: the Gaussian's margin",
        "over the prior, from the same resamples of the held-out tokens (interval above 0: the prior is surely",
        "closer). nn_train_ratio: median distance of samples to",
        "their nearest training token over that of held-out tokens (<< 1: memorisation); near_copies: share of",
        "samples closer to a training token than 99% of held-out tokens are.",
    ]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True, help="UNI prior: a train_prior.py work dir or its prior/ folder")
    p.add_argument("--data-root", required=True, help="patches root (holds metadata/patch_names_all.hdf5)")
    p.add_argument("--index", help="index file (default: <data-root>/metadata/patch_names_all.hdf5)")
    p.add_argument("--train-keys", nargs="+", required=True, help="index keys the prior was trained on")
    p.add_argument("--heldout-keys", nargs="+", required=True, help="index keys of held-out patches")
    p.add_argument("--parent-size", type=int, default=1024, help="side of the indexed patches, px")
    p.add_argument("--features", default="npy", choices=["npy", "packed"])
    p.add_argument(
        "--features-root", help="features folder (default: beside the patches / <root>/features_packed)"
    )
    p.add_argument(
        "--label-from", help="per-label metrics: dataset, cancer or a CSV (as the prior was trained)"
    )
    p.add_argument(
        "--model", help="PixCell transformer whose null condition is a baseline (hub id, folder, .pth)"
    )
    p.add_argument(
        "--n-samples", type=int, default=10000, help="token sets drawn from the prior (and per label)"
    )
    p.add_argument("--max-real", type=int, default=50000, help="samples read from each of the two real sets")
    p.add_argument(
        "--prior-guidance", type=float, default=1.0, help="label guidance of the per-label samples"
    )
    p.add_argument("--prior-steps", type=int, default=DEFAULT_FLOW_STEPS)
    p.add_argument("--k", type=int, default=3, help="k of the k-NN precision/recall")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples of the Frechet distances")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="report folder (metrics.json, report.md)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.n_samples < 2 or args.max_real < 2:
        raise ValueError("--n-samples and --max-real: expected >= 2")

    device = resolve_device(args.device)
    prior = load_prior(args.prior, device)
    if args.label_from and not prior.labels:
        raise ValueError(f"--label-from {args.label_from}: the prior {args.prior} was trained without labels")
    null = None
    if args.model:
        from diffusion.model.loading import load_transformer

        transformer = load_transformer(args.model)
        if transformer.config.caption_num_tokens != prior.num_tokens:
            raise ValueError(
                f"--model {args.model}: takes {transformer.config.caption_num_tokens} UNI tokens, "
                f"the prior makes {prior.num_tokens}"
            )
        null = token_rows(transformer.null_condition(1).float())
    train, _ = load_set(args, args.train_keys, prior, "train")
    heldout, heldout_labels = load_set(args, args.heldout_keys, prior, "heldout")
    train_rows = token_rows(train)
    progress = not args.no_progress

    def evaluate(samples: np.ndarray, real: np.ndarray) -> dict:
        return prior_metrics(
            token_rows(samples), token_rows(real), train_rows, null, args.k, args.n_boot, args.seed
        )

    results = {"prior": str(args.prior), "settings": vars(args), "sets": {}}
    samples = sample_tokens(
        prior, args.n_samples, None, 1.0, args.prior_steps, args.seed, args.batch, progress
    )
    results["sets"]["all"] = evaluate(samples, heldout)
    if args.label_from:
        for k, label in enumerate(prior.labels):
            real = heldout[[lab == label for lab in heldout_labels]]
            if len(real) <= args.k:
                results["sets"][label] = {"skipped": f"{len(real)} held-out samples"}
                continue
            s = sample_tokens(
                prior,
                args.n_samples,
                label,
                args.prior_guidance,
                args.prior_steps,
                args.seed + k + 1,
                args.batch,
                progress,
            )
            results["sets"][label] = evaluate(s, real)
    out = Path(args.out)
    write_report(out, results)
    for name, m in results["sets"].items():
        if "fd" in m:
            print(
                f"{name:>16s}  fd {m['fd']:.4g} [{m['fd_low']:.4g}, {m['fd_high']:.4g}]  gaussian {m['fd_gaussian']:.4g}"
                f"  precision {m['precision']:.3f}  recall {m['recall']:.3f}  nn_train_ratio {m['nn_train_ratio']:.3f}"
            )
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
