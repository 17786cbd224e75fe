"""Does synthetic data help? Linear probes on frozen encoder features, real vs real + synthetic vs synthetic.

    python -m tools.probe --train DATA --test TEST --synthetic AUG --out probe_report \\
        --encoder uni2=/weights/uni2h/pytorch_model.bin --encoder hoptimus0=/weights/H-optimus-0 \\
        --fractions 0.01 0.1 1.0 --seeds 5

DATA, TEST and every --synthetic folder are labelled folders, <class>/<image> (tools/augment.py writes its
output that way). Each encoder embeds every folder once (features cached like tools/evaluate.py's); a logistic
regression probe is trained on real only, real + synthetic and synthetic only, at each fraction of the real
training images and each seed, and scored on TEST: macro-F1 and balanced accuracy with 95% bootstrap CIs, and
a paired-bootstrap p-value for the gain of real + synthetic over real. Writes metrics.json, report.md and
report.png (F1 against the fraction, with CI bands) into --out. See docs/applications.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusion.atomic import atomic_path, atomic_write_bytes
from diffusion.command import resolve_device, run_cli
from diffusion.metrics.cache import open_feature_cache
from diffusion.metrics.encoders import load_feature_encoder, parse_encoder_spec
from diffusion.metrics.probe import labelled_features, report_figure, report_markdown, run_probe
from diffusion.writable import check_writable
from tools.cli import DTYPES, add_feature_args, check_numeric_args


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="labelled real training images: DIR/<class>/<image>")
    p.add_argument("--test", required=True, help="labelled real test images (never used for training)")
    p.add_argument(
        "--synthetic", nargs="+", default=[], help="labelled synthetic folders (tools/augment.py OUT)"
    )
    p.add_argument(
        "--encoder",
        action="append",
        required=True,
        metavar="NAME=SOURCE[,opt=value]",
        help="frozen encoder (repeatable): a preset (uni2, hoptimus0, virchow2) or NAME=SOURCE as in "
        "tools/evaluate.py",
    )
    p.add_argument(
        "--fractions", type=float, nargs="+", default=[1.0], help="fractions of --train to probe at"
    )
    p.add_argument("--seeds", type=int, default=5, help="training subsets (and probe seeds) per fraction")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the test set")
    p.add_argument(
        "--C", type=float, default=1.0, dest="c", help="inverse L2 strength of the logistic regression"
    )
    p.add_argument("--out", required=True, help="report folder: metrics.json, report.md, report.png")
    p.add_argument("--seed", type=int, default=0, help="seeds the training subsets and the bootstrap")
    add_feature_args(p)
    args = p.parse_args(argv)
    check_numeric_args(args)  # before any encoder loads: ranges, and where the report goes
    check_writable(args.out, "--out")

    specs = [parse_encoder_spec(e) for e in args.encoder]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--encoder: names given twice ({', '.join(names)})")
    syn_names = [Path(d).name or d for d in args.synthetic]
    if len(set(syn_names)) != len(syn_names):
        raise ValueError(f"--synthetic: folders must have distinct names ({', '.join(syn_names)})")
    device = resolve_device(args.device)
    cache = open_feature_cache(args.cache_dir, not args.no_cache)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, progress=not args.no_progress)

    encoders, info, counts = {}, {}, {}
    for spec in specs:
        extractor = load_feature_encoder(spec, device, DTYPES[args.dtype])
        train = labelled_features(args.train, "--train", extractor, cache, **common)
        test = labelled_features(args.test, "--test", extractor, cache, **common)
        synthetic = {
            n: labelled_features(d, "--synthetic", extractor, cache, **common)
            for n, d in zip(syn_names, args.synthetic)
        }
        encoders[spec.name] = run_probe(
            train, test, synthetic, args.fractions, args.seeds, args.n_boot, c=args.c, seed=args.seed
        )
        info[spec.name] = extractor.info
        counts = {
            "n_train": len(train),
            "n_test": len(test),
            **{f"n_syn:{n}": len(s) for n, s in synthetic.items()},
        }
    first = next(iter(encoders.values()))
    report = {
        "encoders": encoders,
        "encoder_info": info,
        "settings": {
            "train": args.train,
            "test": args.test,
            "synthetic": dict(zip(syn_names, args.synthetic)),
            "classes": first["classes"],
            "fractions": args.fractions,
            "seeds": args.seeds,
            "n_boot": args.n_boot,
            "C": args.c,
            "seed": args.seed,
            **counts,
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "metrics.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out / "report.md", report_markdown(report).encode())
    with atomic_path(out / "report.png") as tmp:
        report_figure(report, tmp)
    for enc, res in encoders.items():
        for c in res["comparisons"]:
            g = c["f1_gain"]
            print(
                f"{enc} {c['synthetic']} @ {c['fraction']:g}: F1 gain {g['value']:+.3f} "
                f"[{g['low']:+.3f}, {g['high']:+.3f}], p = {c['p_f1']:.3g}"
            )
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
