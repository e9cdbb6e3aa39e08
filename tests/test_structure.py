"""The package's shape: config is the ground floor, no import cycle, every module imports alone."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tier("unit")

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
    """The backend picks the strategy; the private-API table lists DeepSpeed's attribute; the launch
    reader knows its profile's name. Nothing else branches on it."""
    naming = sorted(name for name, path in MODULES.items()
                    if any("deepspeed" in m.lower() for m in code_mentions(ast.parse(path.read_text()))))
    assert naming == ["dist_gan.core.private_api", "dist_gan.run.backend", "dist_gan.run.backend.deepspeed",
                      "dist_gan.run.launcher"]


def test_the_backend_has_no_deepspeed_branch_outside_its_strategy():
    """``is_deepspeed`` is gone: the backend's functions delegate to ``strategy(accelerator)``."""
    source = MODULES["dist_gan.run.backend"].read_text()
    assert "is_deepspeed" not in "".join(MODULES[m].read_text() for m in MODULES)
    assert source.count("DistributedType.DEEPSPEED") == 1  # strategy() picks the strategy, once


def test_every_function_fits_on_a_screen():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long


# The layers, lowest first: a module imports from its own layer and those below, never above; no
# module but the command dispatcher imports an entry point.
LAYERS = {
    "foundation": ("dist_gan.config", "dist_gan.core"),
    "library": ("dist_gan.data", "dist_gan.models", "dist_gan.losses", "dist_gan.metrics"),
    "run": ("dist_gan.run",),
    "tools": ("dist_gan.tools",),
}
ENTRY_POINTS = {"dist_gan", "dist_gan.__main__", "dist_gan.cli", "dist_gan.train", "dist_gan.sample",
                "dist_gan.evaluate", "dist_gan.export", "dist_gan.data.__main__", "dist_gan.metrics.__main__"}
ORDER = [*LAYERS, "entry"]


def layer_of(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry"
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def all_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dist_gan"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dist_gan"))
    return found


def upward_imports(modules: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imported in sorted(modules.items()):
        for target in sorted(imported):
            if target in ENTRY_POINTS and module not in ("dist_gan.cli", "dist_gan.__main__"):  # dispatchers
                wrong.append(f"{module} imports the entry point {target}")
            elif ORDER.index(layer_of(target)) > ORDER.index(layer_of(module)):
                wrong.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    return wrong


def test_no_module_imports_upwards_across_layers():
    assert upward_imports({name: all_imports(path) for name, path in MODULES.items()}) == []


def test_the_layer_check_fails_on_an_upward_import():
    """It cannot pass by construction: a network importing the backend, a metric importing a
    tool, and the loop importing a command are each caught."""
    assert upward_imports({"dist_gan.models.dcgan": {"dist_gan.run.backend"},
                           "dist_gan.metrics.evaluator": {"dist_gan.tools.generate"},
                           "dist_gan.run.loop": {"dist_gan.sample"}}) == [
        "dist_gan.metrics.evaluator (library) imports dist_gan.tools.generate (tools)",
        "dist_gan.models.dcgan (library) imports dist_gan.run.backend (run)",
        "dist_gan.run.loop imports the entry point dist_gan.sample"]


def test_about_ten_top_level_names():
    """The package's top level: entry points, the config, and one folder per layer."""
    names = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.startswith("__"))
    assert names == ["cli.py", "config.py", "core", "data", "evaluate.py", "export.py", "losses.py", "metrics",
                     "models", "run", "sample.py", "tools", "train.py"]


def test_a_unit_test_that_starts_python_is_caught():
    """conftest's guard on unit tests: a training run, a CLI or a launcher is refused; a tool a
    library runs (ctypes' ldconfig, the loader's pipe: commands) is not the test's."""
    import sys

    from conftest import starts_python

    assert starts_python([sys.executable, "-m", "dist_gan.train", "--help"])
    assert starts_python([str(Path(sys.executable).parent / "accelerate"), "launch"])
    assert starts_python("python -c pass")
    assert not starts_python(["/sbin/ldconfig", "-p"]) and not starts_python("curl -s http://x")
