"""Speed of the memorisation audit (tools/audit.py): feature search at 100k and 1M stored vectors, and the whole
audit in images/s, printed as tables.

    python -m benchmarks.bench_audit                          # 100k and 1M stored 1536-d vectors, this machine
    python -m benchmarks.bench_audit --sizes 100000 --e2e-images 100

Search: stored vectors are UNI2-h-sized (1536-d) random draws around 2,000 cluster centres (tissue features
cluster; uniform noise would be the worst case for an inverted file), 1,000 queries, k = 3. Backends of
diffusion/audit/search.py: `exact` (numpy, chunked), `flat` (faiss, exact) and `ivf` (faiss, 8-bit codes,
sqrt(N) lists, nprobe 32); recall@1 is against the exact answer. Backends whose float32 copy would exceed
--max-gb are skipped (1M x 1536 float32 is 6.1 GB).
End to end: `audit()` on random-texture PNG tiles with a tiny stand-in encoder (tests' UNI stand-in: embedding
at UNI2-h's cost is benchmarks/eval_throughput.py's number), k = 3 pixel candidates per image; the split
shows where the time goes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion.audit.search import FeatureIndex


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray, chunk: int = 65536):
    """Yield (chunk, dim) float32 blocks of points around random `centres` (noise 0.5 per dimension)."""
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        yield (centres[rng.integers(0, len(centres), m)] + 0.5 * rng.standard_normal((m, dim))).astype(
            np.float32
        )


def streamed_top1(queries: np.ndarray, blocks: Iterable[np.ndarray]) -> np.ndarray:
    """Exact top-1 cosine neighbour of each query over blocks of stored vectors, one block at a time."""
    from diffusion.audit.search import normalise

    q = normalise(queries)
    best_s, best_i, start = np.full(len(q), -np.inf), np.zeros(len(q), np.int64), 0
    for block in blocks:
        sims = q @ normalise(block).T
        j = sims.argmax(1)
        better = sims[np.arange(len(q)), j] > best_s
        best_s[better], best_i[better] = sims[np.arange(len(q)), j][better], j[better] + start
        start += len(block)
    return best_i


def bench_search(
    sizes: list[int], dim: int, n_queries: int, max_gb: float, backends: list[str]
) -> list[dict]:
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((2000, dim)).astype(np.float32)
        queries = next(clustered(n_queries, dim, np.random.default_rng(1), centres))
        gb = n * dim * 4 / 1e9
        truth = None
        for backend in backends:
            if backend in ("exact", "flat") and gb > max_gb:
                rows.append({"stored": n, "backend": backend, "note": f"skipped: {gb:.1f} GB > --max-gb"})
                continue
            t0 = time.perf_counter()
            if backend == "exact":
                index = FeatureIndex(
                    np.concatenate(list(clustered(n, dim, np.random.default_rng(0), centres))), "exact"
                )
            else:
                blocks = clustered(n, dim, np.random.default_rng(0), centres)
                index = FeatureIndex(next(blocks), backend, total=n)
                for block in blocks:
                    index.add(block)
            build = time.perf_counter() - t0
            index.search(queries[:10], 3)  # warm-up
            t0 = time.perf_counter()
            _, idx = index.search(queries, 3)
            qps = n_queries / (time.perf_counter() - t0)
            if backend in ("exact", "flat") and truth is None:
                truth = idx[:, 0]
            if truth is None:  # no exact index in memory: stream the stored vectors once for the true top-1
                truth = streamed_top1(queries, clustered(n, dim, np.random.default_rng(0), centres))
            recall = float((idx[:, 0] == truth).mean()) if truth is not None else float("nan")
            rows.append({"stored": n, "backend": backend, "build_s": build, "qps": qps, "recall@1": recall})
            print(f"  search: {n} stored, {backend}: {qps:.0f} queries/s", flush=True)
            del index
    return rows


def bench_end_to_end(n_syn: int, n_train: int, k: int) -> dict:
    from diffusion.audit.audit import AuditSettings, audit, set_features
    from diffusion.audit.images import from_folder
    from diffusion.metrics.encoders import load_feature_encoder
    from diffusion.standins import build_tiny_uni

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, n in (("train", n_train), ("syn", n_syn)):
            (root / name).mkdir()
            for i in range(n):
                # smooth random texture (a noise field blurred by upsampling), so NCC is meaningful
                small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(small).resize((256, 256), Image.BICUBIC).save(root / name / f"{i}.png")
        uni = build_tiny_uni(root / "uni", init_values=None)
        train, syn = from_folder(root / "train", "train", False), from_folder(root / "syn", "syn", False)
        extractor = load_feature_encoder(f"uni2={uni}")
        t0 = time.perf_counter()
        set_features(extractor, train, progress=False)
        embed_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        set_features(extractor, syn, progress=False)
        embed_syn = time.perf_counter() - t0
        t0 = time.perf_counter()
        audit(train, syn, None, [lambda: extractor], AuditSettings(k=k), progress=False)
        total = time.perf_counter() - t0
    return {
        "synthetic": n_syn,
        "train": n_train,
        "k": k,
        "total_s": total,
        "img_s": n_syn / total,
        "embed_img_s": (n_train + n_syn) / (embed_train + embed_syn),
        "pixel_img_s": n_syn / max(total - embed_train - embed_syn, 1e-9),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--backends", nargs="+", default=["exact", "flat", "ivf"])
    p.add_argument("--max-gb", type=float, default=2.0, help="skip exact/flat above this float32 size")
    p.add_argument("--e2e-images", type=int, default=200, help="synthetic images in the end-to-end run")
    p.add_argument("--e2e-train", type=int, default=1000, help="training images in the end-to-end run")
    p.add_argument("--k", type=int, default=3)
    args = p.parse_args()

    rows = bench_search(args.sizes, args.dim, args.queries, args.max_gb, args.backends)
    print(f"\nFeature search, {args.dim}-d, {args.queries} queries, k=3\n")
    print("| stored | backend | build s | queries/s | recall@1 |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if "note" in r:
            print(f"| {r['stored']:,} | {r['backend']} | - | - | {r['note']} |")
        else:
            print(
                f"| {r['stored']:,} | {r['backend']} | {r['build_s']:.1f} | {r['qps']:,.0f} | {r['recall@1']:.3f} |"
            )
    if args.e2e_images:
        e = bench_end_to_end(args.e2e_images, args.e2e_train, args.k)
        print(
            f"\nEnd to end (audit(), tiny stand-in encoder, {e['synthetic']} synthetic vs {e['train']} training "
            f"images, k={e['k']})\n"
        )
        print("| images/s (whole audit) | embedding images/s | pixel check + search images/s |")
        print("| --- | --- | --- |")
        print(f"| {e['img_s']:.1f} | {e['embed_img_s']:.0f} | {e['pixel_img_s']:.1f} |")


if __name__ == "__main__":
    main()
