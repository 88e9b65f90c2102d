"""The layout of nlref.nlmeans: imports run one way (no circle), none from inside a function."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import nlref

NLMEANS = Path(nlref.__file__).parent / "nlmeans"


def _imports(path):
    """The nlref.nlmeans modules ``path`` imports (relative ``from .x import``), anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nlref.nlmeans."):
            found.add(node.module.split(".")[2])
    return found


def test_nlmeans_modules_import_one_way():
    """No import circle in nlref.nlmeans, and no module imports a package module from inside a function."""
    modules = {p.stem: p for p in NLMEANS.glob("*.py") if p.stem != "__init__"}
    graph = {name: _imports(path) & set(modules) for name, path in modules.items()}
    assert graph["checks"] == set() and "api" not in set().union(*graph.values())
    assert {"overlap", "store"} <= graph["chunked"] and graph["api"] >= {"overlap", "params", "checks"}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import circle: {' -> '.join([*trail, name])}"
        state[name] = "open"
        for other in sorted(graph[name]):
            visit(other, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
        importlib.import_module(f"nlref.nlmeans.{name}")
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.level == 1]
                assert not inner, f"{name}.{node.name} imports .{inner[0].module} inside a function"
