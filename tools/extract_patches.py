"""Tile whole-slide images into square patches at a target resolution (default 1024 px at 20x = 0.5 um/px).

    python -m tools.extract_patches slides/*.svs --out patches --dataset tcga_diagnostic --group brca
    python -m tools.extract_patches --manifest slides.csv --out patches --workers 8   # columns path,dataset,group[,mpp]

Output (the published PixCell layout): `<out>/<dataset>/<group>/single_<size>/<slide>/<row>_<col>.png` plus a
`summary.json` per slide (patches kept, tissue fractions, geometry). Resumable: run the same command again; finished
slides are skipped and an interrupted slide continues where it stopped (patches are written atomically).
A slide that cannot be tiled (unreadable, no resolution metadata) is logged and counted; the run stops with an
error once more than --max-failed-slides have failed (default 0: the first one).
"""

from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from diffusion.command import run_cli
from diffusion.data.slides import SlideError, SlideJob, SlideSummary, TilingParams, extract_slide

# Extensions openslide/tiffslide read (a folder argument is searched for these).
SLIDE_EXTENSIONS = {
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
}


def _run(job: SlideJob, out: str, params: TilingParams, backend: str, progress: bool) -> SlideSummary:
    return extract_slide(job, out, params, backend=backend, progress=progress)


def collect_jobs(args: argparse.Namespace) -> list[SlideJob]:
    """Slides from positional paths (files or folders) and/or a CSV manifest; duplicates are an error."""
    jobs: list[SlideJob] = []
    for item in args.slides:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SLIDE_EXTENSIONS and p.is_file())
            if not files:
                raise ValueError(f"{path}: no slide files ({', '.join(sorted(SLIDE_EXTENSIONS))}) inside")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such slide file or folder")
        if args.dataset is None or args.group is None:
            raise ValueError("--dataset and --group are required for slides given on the command line")
        jobs += [SlideJob(str(f), args.dataset, args.group, args.mpp) for f in files]
    if args.manifest is not None:
        if not args.manifest.is_file():
            raise FileNotFoundError(f"--manifest {args.manifest}: no such file")
        with open(args.manifest, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "dataset", "group"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"--manifest {args.manifest}: missing column(s) {sorted(missing)} (need path,dataset,group)"
                )
            for i, row in enumerate(reader, start=2):
                mpp = row.get("mpp") or args.mpp
                try:
                    mpp = float(mpp) if mpp not in (None, "") else None
                except ValueError:
                    raise ValueError(
                        f"--manifest {args.manifest} line {i}: mpp {row['mpp']!r} is not a number"
                    ) from None
                jobs.append(SlideJob(row["path"], row["dataset"], row["group"], mpp, row.get("name") or None))
    if not jobs:
        raise ValueError("no slides given (pass slide files/folders or --manifest)")
    seen: dict[tuple, str] = {}
    for job in jobs:
        key = (job.dataset, job.group, job.slide_name)
        if key in seen:
            raise ValueError(
                f"two slides map to {'/'.join(key)}: {seen[key]} and {job.path} (rename or use a manifest name)"
            )
        seen[key] = job.path
    return jobs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("slides", nargs="*", help="slide files or folders (searched recursively)")
    p.add_argument(
        "--manifest", type=Path, default=None, help="CSV with columns path,dataset,group[,mpp][,name]"
    )
    p.add_argument("--out", type=Path, required=True, help="patches root folder")
    p.add_argument("--dataset", default=None, help="dataset name (first folder level), e.g. tcga_diagnostic")
    p.add_argument("--group", default=None, help="group name (second folder level), e.g. the cancer type")
    p.add_argument("--patch-size", type=int, default=1024, help="patch side in px (default 1024)")
    p.add_argument("--magnification", type=float, default=20.0, help="target magnification; 20x = 0.5 um/px")
    p.add_argument("--target-mpp", type=float, default=None, help="target um/px (overrides --magnification)")
    p.add_argument("--mpp", type=float, default=None, help="level-0 um/px for slides whose metadata lacks it")
    p.add_argument(
        "--mpp-tolerance", type=float, default=0.05, help="read 1:1 when within this relative error"
    )
    p.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue fraction of a kept patch")
    p.add_argument(
        "--min-saturation", type=int, default=20, help="floor of the Otsu saturation threshold (0-255)"
    )
    p.add_argument(
        "--format", choices=["png", "jpeg"], default="png", help="patch image format (PNG: lossless)"
    )
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--backend", choices=["auto", "openslide", "tiffslide"], default="auto")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel")
    p.add_argument(
        "--max-failed-slides", type=int, default=0, help="stop once more slides than this have failed"
    )
    p.add_argument("--summary-csv", type=Path, default=None, help="also write one line per slide to this CSV")
    return p


def main(argv: list[str] | None = None) -> int:
    """Bad input, an unwritable or full output: one `error:` line, exit status 2."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: expected >= 1")
    if args.mpp is not None and args.mpp <= 0:
        raise ValueError(f"--mpp {args.mpp}: expected um/px > 0")
    if args.magnification <= 0:
        raise ValueError(f"--magnification {args.magnification}: expected > 0")
    target_mpp = args.target_mpp if args.target_mpp is not None else 10.0 / args.magnification
    params = TilingParams(
        args.patch_size,
        target_mpp,
        args.mpp_tolerance,
        args.min_tissue,
        args.min_saturation,
        args.format,
        args.jpeg_quality,
    )
    jobs = collect_jobs(args)

    summaries: list[SlideSummary] = []
    failures: list[tuple[str, str]] = []
    bar = tqdm(total=len(jobs), desc="slides", unit="slide")

    def record(job: SlideJob, summary: SlideSummary | None, err: Exception | None) -> bool:
        """Log one finished slide; False when the failure allowance is used up."""
        bar.update(1)
        if err is None:
            summaries.append(summary)
            tqdm.write(
                f"{summary.status} {job.dataset}/{job.group}/{summary.slide}: {summary.patches_kept} patches "
                f"(grid {summary.grid[0]}x{summary.grid[1]}, slide tissue {summary.slide_tissue_fraction:.2f}, "
                f"kept mean tissue {summary.mean_tissue_fraction:.2f})"
            )
            bar.set_postfix(patches=sum(s.patches_kept for s in summaries), failed=len(failures))
            return True
        failures.append((job.path, str(err)))
        tqdm.write(f"skip slide {job.path}: {err} [{len(failures)} failed so far]")
        bar.set_postfix(patches=sum(s.patches_kept for s in summaries), failed=len(failures))
        return len(failures) <= args.max_failed_slides

    try:  # the bar ends its line before an error line is printed
        stopped = False
        out = str(args.out)
        if args.workers == 1:
            for job in jobs:
                try:
                    summary, err = extract_slide(job, out, params, args.backend, progress=True), None
                except (SlideError, ValueError) as e:  # ValueError: parameters differ from a previous run
                    summary, err = None, e
                if not record(job, summary, err):
                    stopped = True
                    break
        else:
            with ProcessPoolExecutor(max_workers=args.workers) as pool:
                pending = {pool.submit(_run, job, out, params, args.backend, False): job for job in jobs}
                while pending and not stopped:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        job = pending.pop(fut)
                        err = fut.exception()
                        if err is not None and not isinstance(err, (SlideError, ValueError)):
                            raise err
                        if not record(job, fut.result() if err is None else None, err):
                            stopped = True
                for fut in pending:
                    fut.cancel()
    finally:
        bar.close()

    if args.summary_csv is not None:
        from diffusion.atomic import atomic_path

        fields = (
            [k for k in asdict(summaries[0]) if k not in ("patches", "params")] if summaries else ["slide"]
        )
        with atomic_path(args.summary_csv) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for s in summaries:
                writer.writerow(asdict(s))

    total = sum(s.patches_kept for s in summaries)
    print(
        f"{len(summaries)} slides, {total} patches at {params.patch_size} px, {len(failures)} failed -> {args.out}"
    )
    if stopped:
        path, reason = failures[-1]
        more = f" ({len(failures)} slides failed; allowed {args.max_failed_slides}, see --max-failed-slides)"
        print(f"error: {reason}{more}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
