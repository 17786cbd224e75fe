"""`tools.sample` with PixCell-256 as the default model (same flags; see `python -m tools.sample --help`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from diffusion.command import run_cli, run_with_default_model

MODEL = "StonyBrook-CVLab/PixCell-256"


def main(argv: Sequence[str] | None = None) -> int:
    return run_with_default_model("tools.sample", MODEL, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
