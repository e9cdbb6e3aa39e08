"""Every command-line flag and config key that README.md and docs/ name exists."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest

from dist_gan.config import Config

pytestmark = pytest.mark.tier("unit")

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "DEVELOPERS.md", REPO / "slurm" / "README.md",
        *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = {f.name for f in dataclasses.fields(Config)}
# Flags of the tools we document but do not own (accelerate launch, torchrun, Slurm, TensorBoard, pytest).
EXTERNAL_FLAGS = {
    "config_file", "cpu", "dist", "durations", "format", "gpus-per-node", "logdir", "machine_rank",
    "main_process_ip", "main_process_port", "master_port", "me", "nodes", "num_machines", "num_processes",
    "open-mode", "port", "requeue", "signal", "time",
}


def config_keys(node=Config, prefix: str = "") -> set[str]:
    found = set()
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        if dataclasses.is_dataclass(hints[f.name]):
            found |= config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            found.add(prefix + f.name)
    return found


def our_flags() -> set[str]:
    """Parameters of the fire entry points and argparse flags of the bench scripts."""
    from dist_gan import evaluate, export, sample, train
    from dist_gan.data import __main__ as data_cli
    from dist_gan.metrics import __main__ as metrics_cli

    functions = [train.main, sample.main, evaluate.main, export.main, data_cli.prepare, data_cli.verify,
                 metrics_cli.train_classifier_command]
    flags = {name for fn in functions for name in inspect.signature(fn).parameters}
    for script in (REPO / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {a.value.lstrip("-") for a in node.args if isinstance(a, ast.Constant)}
    return flags


# docs/faults.md is generated from the fault tests' own names, which misspell flags on purpose
@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "faults.md"], ids=lambda p: str(p.relative_to(REPO)))
def test_named_flags_and_config_keys_exist(doc):
    text = doc.read_text()
    keys, flags = config_keys(), our_flags() | EXTERNAL_FLAGS
    dotted = set(re.findall(r"--([a-z_]+(?:\.[a-z_0-9]+)+)", text))
    dotted |= set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)[=:]", text))
    if doc.parent != REPO / "docs":  # user-facing pages: a bare `section.key` is a config key too;
        dotted |= set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)`", text))  # design notes name code
    sections = {k.rsplit(".", 1)[0] for k in keys}
    unknown_keys = sorted(k for k in dotted if k.split(".")[0] in SECTIONS and k not in keys
                          and k not in sections and k != "run.lock"
                          and not re.search(r"\.(safetensors|json|md|png|yaml|pt)$", k))  # file names
    plain = set(re.findall(r"(?<![\w-])--([a-z][a-z_0-9-]*)(?![.\w])", text))
    unknown_flags = sorted(plain - flags)
    assert not unknown_keys and not unknown_flags, (f"{doc.name}: config keys {unknown_keys}, "
                                                    f"flags {unknown_flags}")


def code_names() -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(every function, class, method and module-level name in dist_gan/, bench/ and tests/; the names
    of each dist_gan module by its short name; every .py path relative to the repository)."""
    names: set[str] = set()
    by_module: dict[str, set[str]] = {}
    paths: set[str] = set()
    for root in ("dist_gan", "bench", "tests"):
        for path in (REPO / root).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            paths.add(rel)
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    found.add(node.name)
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    found |= {t.id for t in targets if isinstance(t, ast.Name)}
                    found |= {t.attr for t in targets if isinstance(t, ast.Attribute)}
            names |= found
            if root == "dist_gan":
                by_module.setdefault(path.stem if path.stem != "__init__" else path.parent.name, set()).update(found)
    return names, by_module, paths


# Names of the libraries we build on that the docs mention in backticks
EXTERNAL_NAMES = {
    "ShardWriter", "_original_forward",
    "Accelerator", "DeepSpeedPlugin", "GradScaler", "InceptionScore", "InitProcessGroupKwargs",
    "KernelInceptionDistance", "KillWait", "NodeAddr", "OSError", "SeedSequence",
}
EXTERNAL_CALLS = {
    "autograd.grad", "backward", "build", "cdist", "check_ddp_consistency", "deepspeed.initialize", "float",
    "flock", "int", "interpolate", "load_state_dict", "no_sync", "optimizer.step", "prepare",
    "requires_grad_", "save_checkpoint", "set_seed", "sqrtm", "state_dict", "step", "tolist", "torch.where",
    "unwrap_model", "upfirdn2d",
}  # build: the user's feature-net factory in README


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "DEVELOPERS.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_named_modules_functions_and_classes_exist(doc):
    """Every module path, `Class`, `function()`, `_private` and `module.name` in backticks exists in the code."""
    names, by_module, paths = code_names()
    basenames = {p.rsplit("/", 1)[-1] for p in paths} | {p.split("/", 1)[-1] for p in paths}
    missing = []
    for token in backticked(doc.read_text()):
        token = token.strip()
        for path in re.findall(r"(?<![\w.])((?:[\w]+/)*\w+\.py)\b", token):
            if path not in paths and path not in basenames and f"dist_gan/{path}" not in paths:
                missing.append(path)
        if " " in token or "=" in token or token.startswith(("-", "$")):
            continue
        name = token.split("(", 1)[0]
        if re.search(r"\.(py|json|jsonl|yaml|yml|md|png|pt|npz|tar|safetensors|lock|gif|mp4|log|sh)$", name):
            continue  # a file name, checked above when it is code
        parts = name.split(".")
        if len(parts) == 2 and parts[0] in by_module and parts[0] not in ("data", "loss", "optim", "train",
                                                                         "run", "model", "eval", "speed",
                                                                         "augment", "schedule"):
            if parts[1] not in by_module[parts[0]] and f"{parts[0]}.{parts[1]}" not in EXTERNAL_CALLS:
                missing.append(name)
            continue
        if len(parts) != 1 or not re.fullmatch(r"[A-Za-z_]\w*", name):
            continue
        camel = re.fullmatch(r"_?[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+", name)
        called = token.endswith(")") and "(" in token
        if (camel or called or name.startswith("_") and not name.startswith("__")) and name not in names \
                and name not in EXTERNAL_NAMES and name not in EXTERNAL_CALLS:
            missing.append(name)
    assert not missing, f"{doc.name} names code that does not exist: {sorted(set(missing))}"


def layout_entries(doc: Path, heading: str) -> list[str]:
    """The ``dist_gan/...`` paths that open the lines of the code block under ``heading``."""
    text = doc.read_text()
    block = text[text.index(heading):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    return [line.split()[0] for line in block.splitlines() if line.startswith("dist_gan/")]


def uncovered_and_unknown(entries: list[str]) -> tuple[list[str], list[str]]:
    """(package modules no entry names, itself or through its folder; entries naming nothing)."""
    package = REPO / "dist_gan"
    modules = [p.relative_to(REPO).as_posix() for p in package.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts]
    folders = [e for e in entries if e.endswith("/")]
    uncovered = sorted(m for m in modules if m not in entries and not any(m.startswith(f) for f in folders))
    unknown = sorted(e for e in entries if not (REPO / e).exists())
    return uncovered, unknown


@pytest.mark.parametrize("doc,heading", [("README.md", "## Layout"),
                                         ("docs/design.md", "## The package on one screen")])
def test_the_layout_lists_match_the_package_tree(doc, heading):
    """Every module of dist_gan/ is in the list (by name, or by its folder), and every entry exists."""
    entries = layout_entries(REPO / doc, heading)
    assert entries, f"{doc}: no layout list under {heading}"
    assert uncovered_and_unknown(entries) == ([], [])


def test_the_layout_check_fails_on_a_stale_list():
    """It cannot pass by construction: a moved module and a missing one are both reported."""
    entries = layout_entries(REPO / "README.md", "## Layout")
    stale = [e for e in entries if e != "dist_gan/run/loop.py"] + ["dist_gan/loop.py"]
    assert uncovered_and_unknown(stale) == (["dist_gan/run/loop.py"], ["dist_gan/loop.py"])


def test_every_allow_listed_external_name_is_mentioned():
    """The allow-lists hold only what the docs name: an entry no page mentions any more is dead."""
    texts = "\n".join(doc.read_text() for doc in DOCS)
    ticked = {token.strip().split("(", 1)[0] for token in backticked(texts)}
    flags = set(re.findall(r"(?<![\w-])--([a-z][a-z_0-9-]*)(?![.\w])", texts))
    dead = sorted((EXTERNAL_NAMES | EXTERNAL_CALLS) - ticked) + sorted(EXTERNAL_FLAGS - flags)
    assert dead == []
