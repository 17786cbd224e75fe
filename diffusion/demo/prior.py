"""The CPU demo's "prior" stage: generation without a reference image, measured against its two bounds.

A UNI prior (train_scripts/train_prior.py, configs/demo/prior_demo.py) is trained on the stand-in UNI features of
the training tiles; then the trained PixCell makes three sets of the same size with tools/sample.py:

    conditional   the held-out tiles' own UNI tokens, each with several seeds (the upper bound: a real reference)
    prior         as many conditions drawn from the prior (no reference image at all)
    null          PixCell's null condition (what "unconditional" sampling conditions on; the lower bound)

and each set's Frechet distance to the held-out tiles in the stand-in UNI space is computed with its bootstrap
interval, and so are the differences between the sets (the demo holds out only 10 tiles: each distance moves a
lot with the reference's resampling, the differences much less). tools/evaluate_prior.py adds the prior's own
numbers in UNI space (no images).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

PRIOR_CONFIG = "configs/demo/prior_demo.py"
SETS = ("conditional", "prior", "null")


def write_conditions(patches: Path, heldout_key: str, work: Path, out: Path, seeds: int) -> int:
    """heldout.npy: each held-out tile's tokens `seeds` times (distinct names, so distinct per-image seeds);
    null.npy: the trained model's null condition, as many times; real/: the held-out tiles (the FD reference).
    Returns the number of images per set."""
    import shutil

    from diffusion.data.features import npy_feature_paths
    from diffusion.data.index import default_index_file, read_index
    from diffusion.model.loading import load_transformer

    names = read_index(default_index_file(patches), [heldout_key])[heldout_key]
    tokens = np.stack(
        [np.load(npy_feature_paths(patches, n)[1]).astype(np.float32) for n in names]
    )  # (n, 1, C)
    heldout = np.repeat(tokens, seeds, axis=0)
    null = load_transformer(work).null_condition(len(heldout)).detach().float().numpy()
    (out / "real").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        shutil.copyfile(patches / name, out / "real" / f"{i:03d}{Path(name).suffix}")
    np.save(out / "heldout.npy", heldout)
    np.save(out / "null.npy", np.ascontiguousarray(null))
    return len(heldout)


# The comparisons the stage reports: FD(a) - FD(b) over shared-reference resamples (> 0: b is closer).
DIFFERENCES = (("null", "prior"), ("conditional", "prior"), ("null", "conditional"))


def image_fds(real: Path, samples: Path, uni_dir: Path, n_boot: int = 500) -> dict:
    """Each set's Frechet distance to the real held-out tiles in the stand-in UNI space, and the differences of
    DIFFERENCES, from one bootstrap that resamples the held-out tiles once per draw (so the 10-tile reference's
    own noise, which moves all three distances together, stays out of the differences)."""
    from diffusion.metrics.distances import compare_frechet_distances
    from diffusion.metrics.encoders import load_feature_encoder
    from diffusion.metrics.features import embed_images
    from diffusion.metrics.images import list_images

    encoder = load_feature_encoder(f"uni2={uni_dir}", "cpu")
    ref = embed_images(encoder, list_images(real, "REAL"), batch_size=32, progress=False)
    feats = {
        name: embed_images(encoder, list_images(samples / name / "syn", "SYN"), batch_size=32, progress=False)
        for name in SETS
    }
    comparison = compare_frechet_distances(feats, ref, n_boot=n_boot)
    return {
        "sets": {name: {**asdict(comparison.estimate(name)), "n_images": len(feats[name])} for name in SETS},
        "differences": {f"{a} - {b}": asdict(comparison.difference(a, b)) for a, b in DIFFERENCES},
        "n_reference": len(ref),
    }


def run_prior_stage(
    run: Callable[..., None],  # Demo.run: one of the project's tools as a subprocess
    out: Path,
    patches: Path,
    work: Path,
    vae_dir: Path,
    uni_dir: Path,
    train_key: str,
    heldout_key: str,
    sample_steps: int,
    seeds: int,  # images per held-out condition (and as many prior / null images in all): --prior-seeds
) -> dict:
    prior_dir, samples = out / "prior", out / "samples_prior"
    # Models this small are many small ops: one OpenMP thread per command is as fast on an idle machine and many
    # times faster on a busy one (two threads spin-waiting for each other).
    one_thread = {"OMP_NUM_THREADS": "1"}
    run(
        "train_scripts.train_prior",
        PRIOR_CONFIG,
        "--work-dir",
        str(prior_dir),
        "--data-root",
        str(patches),
        env=one_thread,
    )
    n = write_conditions(patches, heldout_key, work, samples, seeds)
    common = [
        "--model",
        str(work),
        "--vae",
        str(vae_dir),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--steps",
        str(sample_steps),
        "--seed",
        "0",
        "--batch",
        "16",
        "--no-progress",
    ]
    run(
        "tools.sample",
        *common,
        "--prior",
        str(prior_dir),
        "--n-images",
        str(n),
        "--out",
        str(samples / "prior"),
        env=one_thread,
    )
    run(
        "tools.sample",
        *common,
        "--embeddings",
        str(samples / "heldout.npy"),
        "--out",
        str(samples / "conditional"),
        env=one_thread,
    )
    # The null condition alone: guidance 1 is exactly the unconditional prediction (no second pass).
    run(
        "tools.sample",
        *common,
        "--embeddings",
        str(samples / "null.npy"),
        "--guidance",
        "1",
        "--out",
        str(samples / "null"),
        env=one_thread,
    )
    run(
        "tools.evaluate_prior",
        "--prior",
        str(prior_dir),
        "--data-root",
        str(patches),
        "--train-keys",
        train_key,
        "--heldout-keys",
        heldout_key,
        "--parent-size",
        "256",
        "--model",
        str(work),
        "--n-samples",
        "200",
        "--device",
        "cpu",
        "--out",
        str(out / "eval" / "prior"),
        "--no-progress",
        env=one_thread,
    )
    fds = image_fds(samples / "real", samples, uni_dir)
    uni_space = json.loads((out / "eval" / "prior" / "metrics.json").read_text())["sets"]["all"]
    return {"fd_images": fds, "seeds_per_condition": seeds, "uni_space": uni_space}
