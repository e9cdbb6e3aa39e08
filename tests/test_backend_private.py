"""Private APIs behind one door (issue 33): every private or undocumented attribute of torch,
Accelerate, DeepSpeed and the standard library that dist_gan uses is listed in
``core.private_api.PRIVATE_APIS``, exists in the installed versions, and is reached only through that
module; a missing one is an error naming it."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch

from dist_gan.core.private_api import PRIVATE_APIS, private_api

pytestmark = pytest.mark.tier("unit")

PACKAGE = Path(__file__).resolve().parents[1] / "dist_gan"
DOOR = PACKAGE / "core" / "private_api.py"


def _resolve(path: str):
    """A module or a class from its dotted path."""
    try:
        return importlib.import_module(path)
    except ImportError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


def _instance_attribute_set_in(cls, attribute: str) -> bool:
    """Whether ``cls`` (or a base) assigns ``self.<attribute>`` in its source: attributes that exist
    on instances only."""
    for klass in inspect.getmro(cls):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if f"self.{attribute} =" in source or f"self.{attribute}:" in source:
            return True
    return False


@pytest.mark.parametrize("owner,where,attribute,why", PRIVATE_APIS, ids=[p[2] for p in PRIVATE_APIS])
def test_every_private_attribute_we_use_still_exists(owner, where, attribute, why):
    if attribute == "_original_forward":  # set by Accelerate's prepare under mixed precision
        assert hasattr(_bf16_prepared(torch.nn.Linear(3, 2))[1], attribute)
        return
    if owner == "deepspeed":
        pytest.importorskip("deepspeed")
    target = _resolve(where)
    found = hasattr(target, attribute) or (inspect.isclass(target) and _instance_attribute_set_in(target, attribute))
    assert found, f"{owner} removed {where}.{attribute} (used to {why}): dist_gan needs a new way to do it"


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate's state is a process-wide singleton: an Accelerator made by an earlier test in this
    process (another precision) would refuse bf16. Start and leave every test with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _bf16_prepared(net):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    return accelerator, accelerator.prepare(net)


def test_plain_takes_off_the_autocast_wrapper_as_unwrap_model_does():
    """backend.plain's own unwrapping (no DeepSpeed import) leaves the network as Accelerate's would:
    its forward runs in fp32 again, and the prepared handle shares it."""
    from dist_gan.run.backend import plain

    x = torch.randn(4, 3)
    for unwrap in ("ours", "accelerate"):
        accelerator, prepared = _bf16_prepared(torch.nn.Linear(3, 2))
        exact = x @ prepared.weight.T + prepared.bias
        assert not torch.equal(prepared(x), exact)  # computed in bf16 under the wrapper...
        net = plain(accelerator, prepared) if unwrap == "ours" else accelerator.unwrap_model(
            prepared, keep_fp32_wrapper=False)
        assert net is prepared and "_original_forward" not in vars(net)
        assert torch.equal(net(x), exact), unwrap  # ...and in fp32 again


def test_a_missing_private_attribute_is_an_error_naming_it():
    with pytest.raises(RuntimeError, match=r"has no attribute _get_scale_async, which dist_gan uses to read "
                                           r"the fp16 loss scale"):
        private_api(object(), "_get_scale_async")
    with pytest.raises(ValueError, match="not in PRIVATE_APIS"):
        private_api(torch, "_foreach_add_")


# Underscore names that are public API by their library's documentation.
DOCUMENTED = {"_exit": "os._exit", "_asdict": "namedtuple._asdict", "_replace": "namedtuple._replace"}


def _defined_in_package(private_only: bool = True) -> set[str]:
    """Names dist_gan defines itself (its own functions, classes, attributes, arguments)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[-1])
    return {n for n in names if n.startswith("_") or not private_only}


def foreign_private_uses(source: str, own: set[str]) -> list[str]:
    """Every ``x._name`` (read, written or deleted) whose name dist_gan does not define, and every
    ``getattr``/``hasattr``/``setattr``/``delattr``/``vars`` lookup of a private name by string."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and node.attr not in own and node.attr not in DOCUMENTED):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")
              and not str(node.args[1].value).startswith("__")):
            found.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
        elif (isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant)
              and str(node.left.value).startswith("_") and not str(node.left.value).startswith("__")):
            found.append(f"line {node.lineno}: {node.left.value!r} in ...")
    return found


def test_no_module_but_the_door_touches_a_foreign_private_attribute():
    """The whole source is scanned, not only for the registered names: any ``._name`` dist_gan
    does not define itself is a foreign private attribute and must go through the door."""
    own = _defined_in_package()
    offenders = {str(path.relative_to(PACKAGE)): uses for path in sorted(PACKAGE.rglob("*.py")) if path != DOOR
                 for uses in [foreign_private_uses(path.read_text(), own)] if uses}
    assert offenders == {}
    # the registered internals without an underscore (LambdaLR's base_lrs, ...), read as attributes
    public_looking = {p[2] for p in PRIVATE_APIS if not p[2].startswith("_")} - _defined_in_package(False)
    attributes = {str(path.relative_to(PACKAGE)): sorted({
        f"line {n.lineno}: .{n.attr}" for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Attribute) and n.attr in public_looking})
        for path in PACKAGE.rglob("*.py") if path != DOOR}
    assert {module: uses for module, uses in attributes.items() if uses} == {}
    registered = {p[2] for p in PRIVATE_APIS if p[2].startswith("_")}
    strings = {str(path.relative_to(PACKAGE)): sorted(registered & {
        n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)})
        for path in PACKAGE.rglob("*.py") if path != DOOR}
    for module, names in strings.items():  # by string only as an argument of the door's functions
        source = (PACKAGE / module).read_text()
        for name in names:
            assert f'"{name}"' in source and all(
                line.count(f'"{name}"') == sum(line.count(f'{door}(') for door in
                                                ("private_api", "set_private", "drop_private"))
                or f'"{name}"' not in line for line in source.splitlines()), (module, name)


def test_the_scan_catches_a_private_attribute_it_was_not_told_of():
    """The check cannot pass by construction: a made-up private use is found."""
    own = _defined_in_package()
    assert foreign_private_uses("import torch\ntorch._foreach_mul_([], 2)\n", own) == ["line 2: ._foreach_mul_"]
    assert foreign_private_uses("x = getattr(m, '_orig_mod', m)\n", own) == ["line 1: getattr(..., '_orig_mod')"]
    assert foreign_private_uses("self._mine = 1\nself._mine += 1\n", own | {"_mine"}) == []
