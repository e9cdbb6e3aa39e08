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
EXTERNAL_FLAGS = {"config_file", "num_processes", "machine_rank", "num_machines", "main_process_ip",
                  "main_process_port", "cpu", "multi_gpu", "nodes", "gpus-per-node", "time", "signal",
                  "requeue", "open-mode", "me", "format", "logdir", "port", "durations", "dist",
                  "master_port"}


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
    "DistributedDataParallel", "GradScaler", "LambdaLR", "WebDataset", "WebLoader", "DataLoader", "ShardWriter",
    "ResampledShards", "DataPipeline", "Accelerator", "DeepSpeedPlugin", "InitProcessGroupKwargs",
    "KernelInceptionDistance", "InceptionScore", "FrechetInceptionDistance", "GradientState", "SeedSequence",
    "ChildFailedError", "CalledProcessError", "IterableDataset", "BatchNorm2d", "SummaryWriter", "HfApi",
    "FusedAdam", "DeepSpeedEngine", "ReduceLROnPlateau", "TensorDataset", "ZeroRedundancyOptimizer",
    "LayerNorm", "InstanceNorm2d", "GroupNorm", "PixelShuffle", "FileExistsError", "KeyError",
    "PackageNotFoundError", "AttributeError", "RuntimeError", "OSError", "ValueError", "SystemExit",
    "DistBackendError", "UnsupportedModelRegistryStoreURIException", "MLflowTracker", "TensorBoardTracker",
    "KillWait", "NodeAddr", "SlurmctldHost", "ReturnToService", "RealMemory",
}
EXTERNAL_CALLS = {"save_state", "load_state", "prepare", "backward", "skip_first_batches", "unwrap_model",
                  "register_for_checkpointing", "select_deepspeed_plugin", "enable_deepspeed_plugin",
                  "save_checkpoint", "load_checkpoint", "no_sync", "autocast", "reduce", "gather",
                  "set_seed", "with_epoch", "split_by_node", "main_process_first", "wait_for_everyone",
                  "check_ddp_consistency", "autograd.grad", "torch.compile", "get_last_lr", "step",
                  "set_sync_debug_mode", "flock", "upfirdn2d", "engine.step", "optimizer.step", "zero_grad",
                  "end_training", "init_process_group", "all_reduce", "all_gather", "barrier", "sqrtm",
                  "cdist", "interpolate", "fused_adam", "load_file", "save_file", "state_dict",
                  "load_state_dict", "item", "tolist", "cpu", "float", "int", "bool", "torch.where",
                  "requires_grad_", "build", "deepspeed.initialize"}  # build: the user's feature-net factory in README


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
