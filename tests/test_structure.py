"""The repository's structure: no import cycle anywhere (imports inside functions count), no trainer imports
another trainer, and nothing in the library or the trainers imports the virtual-staining client package."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.source import parse_file

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("diffusion", "tools", "train_scripts", "virtual_staining")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """{module: the project modules it imports}, from every import statement (module level or not)."""
    modules = {module_name(root, p): p for pkg in packages for p in (root / pkg).rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(parse_file(path)):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {r for t in targets if (r := resolve(t)) and r != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph(REPO)) == []


def test_no_trainer_imports_another():
    graph = import_graph(REPO)
    for name, targets in graph.items():
        if name.startswith("train_scripts."):
            others = sorted(t for t in targets if t.startswith("train_scripts.") and t != "train_scripts")
            assert not others, f"{name} imports {others}"


def test_library_and_trainers_do_not_import_virtual_staining():
    graph = import_graph(REPO)
    for name, targets in graph.items():
        if name.split(".")[0] in ("diffusion", "train_scripts"):
            client = sorted(t for t in targets if t.split(".")[0] == "virtual_staining")
            assert not client, f"{name} imports {client}"


def test_the_checks_see_cycles_and_function_level_imports(tmp_path):
    """The graph finds a cycle that closes through an import inside a function, and a relative import."""
    pkg = tmp_path / "diffusion"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from diffusion import a\n    return a\n")
    (pkg / "c.py").write_text("import diffusion.a\n")
    graph = import_graph(tmp_path, ("diffusion",))
    assert graph["diffusion.c"] == {"diffusion.a"}
    assert cycles(graph) == [["diffusion.a", "diffusion.b"]]
