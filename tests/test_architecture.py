"""The package's shape (docs/ARCHITECTURE.md): layers that import only downwards, no import
circles, small modules.  Every import of the package counts, in-function ones included:
they hide a dependency, they do not remove it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "eigendamage"
MAX_LINES = 400
MAX_UPWARD_IMPORTS = 2

# Lowest first; a module belongs to the last entry that is a prefix of its dotted name.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "seeding", "config_files", "modelcall", "layers"),
    ("data", "models", "measure"),
    ("curvature",),
    ("structure", "criteria", "surgery"),
    ("methods",),
    ("io", "train", "latency", "export", "distributed", "compare", "runner", "report", "reported",
     "demo", "benchmarking", "config"),
    ("cli", "__main__", ""),
]  # fmt: skip


def layer_of(module: str) -> int:
    rel = module.removeprefix("eigendamage").removeprefix(".")
    best, best_len = None, -1
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = rel == prefix or rel.startswith(prefix + ".") or prefix == ""
            if matches and len(prefix) > best_len:
                best, best_len = level, len(prefix)
    assert best is not None, module
    return best


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["eigendamage", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports (``from .x import y`` names ``x`` and, if it is
    a module, ``x.y``; a package's ``__init__`` is a module of its own)."""
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(g[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles() -> None:
    assert circles(graph()) == []


def test_imports_run_down_the_layers() -> None:
    upward = sorted(
        f"{src} (layer {layer_of(src)}) -> {dst} (layer {layer_of(dst)})"
        for src, targets in graph().items()
        for dst in targets
        if layer_of(dst) > layer_of(src)
    )
    assert len(upward) <= MAX_UPWARD_IMPORTS, "\n".join(upward)


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_small(name: str) -> None:
    lines = modules()[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{name}: {lines} lines"


def test_the_checker_sees_a_circle_and_an_upward_import() -> None:
    """The checks above can fail: a made-up graph with both faults is caught."""
    g = {"eigendamage.errors": {"eigendamage.cli"}, "eigendamage.cli": {"eigendamage.errors"}}
    assert circles(g) == [["eigendamage.cli", "eigendamage.errors"]]
    assert layer_of("eigendamage.errors") < layer_of("eigendamage.cli")
    assert layer_of("eigendamage.curvature.kfac") == 2 and layer_of("eigendamage") == 6
