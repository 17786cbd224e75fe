"""tests/ mirrors the package: each test module sits in the folder of the package it tests, shared helpers live in
tests/helpers/ or conftest.py, and no test module imports another (pytest's default import mode, no __init__.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import REPO
from tests.helpers.source import parse_file

TESTS = REPO / "tests"
# Only these stay at the top of tests/: the fixtures, this check, and repository-wide structure tests.
TOP_LEVEL = ("conftest.py", "test_layout.py", "test_structure*.py")


def python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def is_test_module(path: Path) -> bool:
    return path.name.startswith("test_") or path.name.endswith("_test.py")


def test_test_modules_sit_in_the_folder_of_a_package():
    misplaced = []
    for path in python_files():
        rel = path.relative_to(TESTS)
        if len(rel.parts) == 1:
            if not any(path.match(pattern) for pattern in TOP_LEVEL):
                misplaced.append(
                    f"{rel}: only {', '.join(TOP_LEVEL)} stay at the top; move it beside its package"
                )
        elif rel.parts[0] == "helpers":
            if is_test_module(path):
                misplaced.append(f"{rel}: tests/helpers/ holds helpers, not tests")
        elif path.name == "conftest.py" or is_test_module(path):
            package = REPO.joinpath(*rel.parts[:-1])
            if not (package / "__init__.py").is_file():
                misplaced.append(f"{rel}: {package.relative_to(REPO)} is not a package of the repository")
        else:
            misplaced.append(
                f"{rel}: a helper module belongs in tests/helpers/ (or a fixture in conftest.py)"
            )
    assert not misplaced, "\n".join(misplaced)


def test_no_init_files_and_unique_basenames():
    # Without __init__.py pytest imports each test module by its basename: two of one name cannot both load.
    paths = python_files()
    assert not [p for p in paths if p.name == "__init__.py"], "no __init__.py under tests/"
    seen: dict[str, Path] = {}
    clashes = []
    for path in paths:
        if path.name == "conftest.py" or path.parent.name == "helpers":
            continue
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(TESTS)} and {path.relative_to(TESTS)}")
        seen[path.name] = path
    assert not clashes, "test module basenames must be unique: " + "; ".join(clashes)


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every import in the file, function-level ones included, as (line, dotted name); relative ones keep dots."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_no_test_module_imports_another():
    paths = python_files()
    # Test folders are on sys.path under pytest's default import mode, so `import test_x` would work too.
    local = {p.stem for p in paths if p.parent.name != "helpers"} - {"conftest"}
    bad = []
    for path in paths:
        for line, name in imported_modules(parse_file(path)):
            top = name.split(".")[0]
            shared = name == "tests.helpers" or name.startswith("tests.helpers.") or name == "conftest"
            if name.startswith(".") or (top == "tests" and not shared) or top in local:
                bad.append(f"{path.relative_to(TESTS)}:{line}: imports {name}")
    assert not bad, "share code through tests/helpers/ or conftest.py fixtures:\n" + "\n".join(bad)
