"""Parsing the repository's own source files in the structure checks."""

from __future__ import annotations

import ast
import gc
from pathlib import Path


def parse_file(path: Path) -> ast.Module:
    """The module's AST. The garbage collector is paused meanwhile: on CPython 3.11 a collection that runs
    finalizers while ast.parse builds its nodes can end in "SystemError: AST constructor recursion depth
    mismatch" (seen once in a full run, after the app and trainer tests had left objects with finalizers)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text(), str(path))
    finally:
        if enabled:
            gc.enable()
