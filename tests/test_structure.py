"""The package's shape: config is the ground floor, no import cycle, every module imports alone."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dist_gan"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def top_level_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports when it is imported (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dist_gan"):
            for alias in node.names:  # `from dist_gan import runlock` imports a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dist_gan"))
    return found


def test_config_imports_nothing_of_the_package():
    tree = ast.parse(MODULES["dist_gan.config"].read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("dist_gan")], imported


def test_no_import_cycle():
    graph = {name: top_level_imports(path) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for child in sorted(graph.get(name, ())):
            if state.get(child) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(child):] + [child]))
            if child in graph and child not in state:
                visit(child, path + [child])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.endswith("__main__")))
def test_each_module_imports_alone(name):
    """Imported first, with no other module of the package loaded (a cycle shows up here)."""
    saved = {k: v for k, v in sys.modules.items() if k == "dist_gan" or k.startswith("dist_gan.")}
    for key in saved:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    finally:
        for key in [k for k in sys.modules if k == "dist_gan" or k.startswith("dist_gan.")]:
            del sys.modules[key]
        sys.modules.update(saved)


def code_mentions(tree: ast.AST) -> list[str]:
    """Identifiers and string constants of ``tree``, docstrings left out."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(n)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.append(node.id)
        elif isinstance(node, ast.Attribute):
            found.append(node.attr)
        elif isinstance(node, ast.alias):
            found.append(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append(node.value)
    return found


def test_only_the_backend_names_deepspeed_in_code():
    naming = sorted(name for name, path in MODULES.items()
                    if any("deepspeed" in m.lower() for m in code_mentions(ast.parse(path.read_text()))))
    assert naming == ["dist_gan.run.backend"]


def test_every_function_fits_on_a_screen():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
