"""Checkpoints: ``accelerator.save_state`` plus the loop's own state, written so a crash never leaves a
half checkpoint that looks whole.

Layout of RUN_DIR/checkpoints/step_00000040/:
  model.safetensors (G), model_1.safetensors (D), optimizer.bin, optimizer_1.bin, scheduler.bin,
  scheduler_1.bin, [scaler.pt], random_states_<rank>.pkl   <- accelerator.save_state, every rank
  trainer_state.pt   step, data-stream position, EMA weights (torch.load(weights_only=True) safe)
  config.yaml        the resolved config the checkpoint was made with
  COMPLETE           written last; a directory without it is never loaded

Every rank writes into ``step_N.tmp``; after a barrier rank 0 adds the loop state, the marker, and
renames the directory into place, so a kill at any moment leaves either the old set or the new one.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from dist_gan.config import Config, ConfigError, save_config, to_dict

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
GENERATOR_WEIGHTS = "model.safetensors"  # accelerate names prepared models in order: G first, then D
# The parts of a config that decide tensor shapes: a checkpoint only loads into the same ones.
SHAPE_KEYS = ("model", "data.resolution", "data.channels")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a complete checkpoint, else the newest complete one of run ``path``."""
    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such checkpoint or run directory: {path}")
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint (no {COMPLETE_MARKER} "
                                "marker: an interrupted save?) nor a run directory holding one")
    return found[-1]


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint to load for ``train.resume`` (None, "auto" or a path), or None to start fresh."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    return find_checkpoint(resume)


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, step: int, trainer_state: dict,
                    config: Config) -> Path:
    """Save everything needed to continue at ``step``; then keep only the newest ``run.keep_last``."""
    final = checkpoint_root(run_dir) / f"step_{step:08d}"
    staging = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(trainer_state, staging / TRAINER_STATE)
        save_config(config, staging / "config.yaml")
        (staging / COMPLETE_MARKER).write_text(f"step: {step}\nworld_size: {accelerator.num_processes}\n")
        _fsync_dir(staging)
        if final.exists():  # e.g. a rerun of the same step after a rollback
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(final.parent)
        for old in list_checkpoints(run_dir)[: -config.run.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, config: Config) -> dict:
    """Restore models, optimisers, schedulers, scaler and RNG from ``path``; return the loop state."""
    check_compatible(path, config)
    accelerator.load_state(str(path))
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)


def load_generator_state(path: Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The generator's weights from a checkpoint: the EMA copy, or the trained (raw) ones."""
    if ema:
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True).get("ema")
        if state is not None:
            return state
        log.warning("%s has no EMA weights (train.ema_decay was 0); using the raw generator", path)
    from safetensors.torch import load_file

    return load_file(path / GENERATOR_WEIGHTS)


def check_compatible(path: Path, config: Config) -> None:
    """Refuse a checkpoint made for other network shapes, naming the keys that differ."""
    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(f"{path} has no config.yaml: not a dist_gan checkpoint")
    saved, current = _flatten(yaml.safe_load(saved_file.read_text())), _flatten(to_dict(config))
    differ = [
        f"  {key}: checkpoint {saved.get(key)!r}, config {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key.startswith(SHAPE_KEYS) and saved.get(key) != current.get(key)
    ]
    if differ:
        raise ConfigError(f"checkpoint {path} was made for another model:\n" + "\n".join(differ))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
