"""The layering of the README's Architecture section, checked on the source: every import (function-level ones
included) of every module of graphsel and its passes points down or sideways, never up, and the
module import graph has no cycle.

    base (errors, version, distributed) ← ir ← ops ← analysis ← pipeline ← passes ← tools ← graphsel (facade)
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"base": 0, "ir": 1, "ops": 2, "analysis": 3, "pipeline": 4, "passes": 5, "tools": 6, "facade": 7}


def _modules() -> dict[str, Path]:
    """Module name -> file, for graphsel/ and passes/ (installed as graphsel.passes)."""
    out = {}
    for root, prefix in ((REPO / "graphsel", "graphsel"), (REPO / "passes", "graphsel.passes")):
        for f in root.rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix] + parts)] = f
    return out


MODULES = _modules()


def layer_of(module: str) -> str:
    if module == "graphsel":
        return "facade"
    part = module.split(".")[1]
    if part in ("errors", "version", "distributed", "__main__"):
        return "tools" if part == "__main__" else "base"
    if part not in LAYERS:
        raise AssertionError(f"module {module} is in no layer (graphsel/{part}): put it in one of {list(LAYERS)}")
    return part


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported graphsel module, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "graphsel":
                    found.append((_known(alias.name), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "graphsel":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else _known(target), node.lineno))
    return found


def _known(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    mine = LAYERS[layer_of(module)]
    for target, line in GRAPH[module]:
        theirs = layer_of(target)
        assert LAYERS[theirs] <= mine, (f"{MODULES[module].relative_to(REPO)}:{line} imports {target} "
                                        f"({theirs} layer) from the {layer_of(module)} layer")
        if module != "graphsel":
            assert target != "graphsel", (f"{MODULES[module].relative_to(REPO)}:{line} imports the graphsel "
                                          f"facade; import from the layer package instead")


def test_no_import_cycles():
    edges = {m: {t for t, _ in imps if t != m} for m, imps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_checker_sees_relative_and_absolute_imports():
    """The parser above must see what the rule is about (a test that cannot fail is a defect)."""
    imports = dict(GRAPH)
    assert any(t == "graphsel.ops.table" for t, _ in imports["graphsel.ops.shape"])
    assert any(t == "graphsel.passes.sconv.module" for t, _ in imports["graphsel.passes.sconv.ecdm"])
    assert layer_of("graphsel.passes.sconv.ecdm") == "passes" and layer_of("graphsel.tools.cli") == "tools"
    assert layer_of("graphsel.distributed") == "base"
