"""Where the tests find the repository and their data, whatever folder a test module sits in."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Goldens of the original PixCell code and the published checkpoint layouts (tests/data/README.md).
DATA = REPO / "tests" / "data"
