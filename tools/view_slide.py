"""A static slide-viewer page (OpenSeadragon over Deep Zoom tiles) for a pyramid that OpenSlide opens.

    python -m tools.view_slide runs/wsi/slide.tif --out runs/wsi/viewer     # then open viewer/index.html

(`tools.sample_wsi --view` writes the same page beside the slide; diffusion/viewer says how it is made.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from diffusion.command import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    from diffusion.viewer import write_viewer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slide", help="a pyramidal slide OpenSlide opens (tools.sample_wsi's slide.tif)")
    p.add_argument("--out", required=True, help="folder for index.html, slide.dzi and slide_files/")
    args = p.parse_args(argv)
    print(write_viewer(args.slide, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
