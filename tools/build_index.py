"""Build, merge or subset the patch index `patches/metadata/patch_names_all.hdf5`.

    python -m tools.build_index --root patches                          # scan the tree, all datasets and sizes
    python -m tools.build_index --root patches --sizes 1024 --datasets tcga_diagnostic gtex
    python -m tools.build_index --merge a.hdf5 b.hdf5 --output patches/metadata/patch_names_all.hdf5
    python -m tools.build_index --from patches/metadata/patch_names_all.hdf5 --keys gtex_1024 --output gtex.hdf5

One string dataset per `<dataset>_<size>` holding patch paths relative to the patches root, sorted by group, slide,
row, column (deterministic). The file is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusion.command import run_cli
from diffusion.data.index import (
    default_index_file,
    merge_indexes,
    read_index,
    resolve_keys,
    scan_patches,
    write_index,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", type=Path, help="patches root to scan")
    src.add_argument("--merge", type=Path, nargs="+", help="index files to merge")
    src.add_argument("--from", dest="source", type=Path, help="index file to subset with --keys")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="only these patch sizes (scan)")
    p.add_argument("--datasets", nargs="+", default=None, help="only these dataset folders (scan)")
    p.add_argument("--keys", nargs="+", default=None, help="keep only these keys, e.g. tcga_diagnostic_1024")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="index to write (default <root>/metadata/patch_names_all.hdf5)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Bad input, an unwritable or full output: one `error:` line, exit status 2."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.root is not None:
        index = scan_patches(args.root, args.sizes, args.datasets)
        output = args.output or default_index_file(args.root)
    else:
        if args.output is None:
            raise ValueError("--output is required with --merge/--from")
        sources = args.merge or [args.source]
        index = merge_indexes(read_index(s) for s in sources)
        output = args.output
    if args.keys is not None:
        index = {k: index[k] for k in resolve_keys(index.keys(), args.keys, "--keys")}
    if not index:
        raise ValueError(
            "no patches found: expected <root>/<dataset>/<group>/single_<size>/<slide>/<row>_<col>.png"
        )
    write_index(output, index)
    for key, names in index.items():
        print(f"{key}: {len(names)} patches")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
