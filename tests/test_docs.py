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

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "DEVELOPERS.md", REPO / "slurm" / "README.md",
        *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = {f.name for f in dataclasses.fields(Config)}
# Flags of the tools we document but do not own (accelerate launch, Slurm, TensorBoard).
EXTERNAL_FLAGS = {"config_file", "num_processes", "machine_rank", "num_machines", "main_process_ip",
                  "main_process_port", "cpu", "multi_gpu", "nodes", "gpus-per-node", "time", "signal",
                  "requeue", "open-mode", "me", "format", "logdir", "port"}


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


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
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
