"""The checkpoint format: one folder per step, written so that a crash never leaves a half checkpoint
that looks whole, and loaded only after checking it is whole and made for this model. Which
checkpoints a run keeps, resumes from and rolls back to is ``retention``'s.

Layout of RUN_DIR/checkpoints/step_00000040/:
  G/, D/                 each network's ``accelerator.save_state``: weights once (model.safetensors,
                         or DeepSpeed's pytorch_model/ with one ZeRO optimizer partition per rank),
                         optimizer, grad scaler, and random_states_<rank>.pkl from every rank
  generator.safetensors  G's weights, for sampling without Accelerate or DeepSpeed
  encoder.safetensors    VAE-GAN only: the encoder's, for reconstructions
  trainer_state.pt       the run state (``runstate``: step, schedulers, EMA weights, loss terms,
                         guard counters, each rank's data-stream position; plain tensors and numbers:
                         loads with torch.load(weights_only=True))
  config.yaml            the resolved config the checkpoint was made with
  manifest.json          written last: every file with its size and CRC-32, the step, world size,
                         backend, and ``healthy`` (no skipped non-finite update since the previous
                         checkpoint, every weight finite): only a healthy checkpoint is a rollback target

Every rank writes into ``step_N.tmp``; after a barrier rank 0 adds the rest, fsyncs it all, writes
the manifest and renames the folder into place. A kill at any moment leaves either the old set of
checkpoints or the new one; a folder without a manifest, or whose files disagree with it, is never
loaded; nor is one whose files fail their checksum (``resume=auto`` then takes the newest one that
verifies). A save that fails (a full disk) removes its staging folder on every rank and raises one
CheckpointError, so the previous checkpoint stays the newest complete one. The folder must be on
storage every rank sees (a shared filesystem on a cluster).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object

from dist_gan.config import Config, ConfigError, save_config, to_dict
from dist_gan.core.fsutil import crc32_of, fsync_dir, fsync_tree, mount_point, write_synced
from dist_gan.run.backend import BACKEND_PICKLE_GLOBALS, check_resumable
from dist_gan.run.runstate import ema_weights

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dist_gan.run.checkpoint/1"
TRAINER_STATE = "trainer_state.pt"
GENERATOR_WEIGHTS = "generator.safetensors"
ENCODER_WEIGHTS = "encoder.safetensors"
# Below this much free space a failed write is reported as a full disk (torch.save says only
# "unexpected pos" when the disk fills under it).
DISK_FULL_BYTES = 1 << 20
# The parts of a config that decide tensor shapes: a checkpoint only loads into the same ones.
SHAPE_KEYS = ("model", "data.resolution", "data.channels")
# What a resume must keep besides the shapes: kimg, the EMA's unit and the saved data position are
# counted in these batches
BATCH_KEYS = ("data.batch_size", "optim.accumulate")


class CheckpointError(ConfigError):
    """A checkpoint is incomplete, damaged, or was made for another model or launch."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run that have a manifest (were completely written), oldest first.

    A staging folder (``step_N.tmp``) never counts, even with its manifest: a save killed between
    the manifest and the rename leaves one, and ranks may list before rank 0 removes it."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*")
             if p.is_dir() and p.suffix != ".tmp" and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint was saved at (from its manifest)."""
    try:
        return int(json.loads((path / MANIFEST).read_text())["step"])
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path / MANIFEST} cannot be read: {err}") from None


@dataclass
class Snapshot:
    """What one checkpoint holds: the accelerators' state (``accelerators`` maps a folder name to
    the Accelerator whose models it holds), the run state (``runstate.RunState.state_dict``, every
    rank's part gathered), the plain networks to write as ``<name>.safetensors`` for sampling (the
    generator, and a VAE-GAN's encoder), the config, and whether it may be a rollback target."""

    step: int
    accelerators: dict[str, Accelerator]
    state: dict
    weights: dict[str, nn.Module]
    config: Config
    healthy: bool = True


def save_checkpoint(snapshot: Snapshot, run_dir: str | Path) -> Path:
    """Write ``snapshot`` as ``RUN_DIR/checkpoints/step_N``; return that folder.

    Every rank must call this. If any rank fails to write (a full disk), every rank raises the same
    CheckpointError and the staging folder is removed, so the previous checkpoint stays the newest
    complete one. Which checkpoints to keep is ``retention``'s.
    """
    main = next(iter(snapshot.accelerators.values()))
    final = checkpoint_root(run_dir) / f"step_{snapshot.step:08d}"
    staging = final.with_name(final.name + ".tmp")

    def make_staging() -> None:
        if main.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

    def save_states() -> None:
        for name, accelerator in snapshot.accelerators.items():
            accelerator.save_state(str(staging / name))

    def finish_on_main() -> None:
        if main.is_main_process:
            _finish(snapshot, staging, final, main)

    for work in (make_staging, save_states, finish_on_main):
        _on_every_rank(main, work, staging)
    main.wait_for_everyone()
    return final


def _finish(snapshot: Snapshot, staging: Path, final: Path, main: Accelerator) -> None:
    """Rank 0, once every rank's files are in ``staging``: the rest, fsync, manifest, rename."""
    from safetensors.torch import save_file

    for name, module in snapshot.weights.items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, staging / f"{name}.safetensors")
    torch.save(snapshot.state, staging / TRAINER_STATE)
    save_config(snapshot.config, staging / "config.yaml")
    fsync_tree(staging)
    files = sorted(f for f in staging.rglob("*") if f.is_file())
    manifest = {
        "format": MANIFEST_FORMAT, "step": snapshot.step, "world_size": main.num_processes,
        "distributed_type": str(main.distributed_type), "healthy": snapshot.healthy,
        "files": {str(f.relative_to(staging)): f.stat().st_size for f in files},
        "crc32": {str(f.relative_to(staging)): crc32_of(f) for f in files},
    }
    write_synced(staging / MANIFEST, json.dumps(manifest, indent=1))
    fsync_dir(staging)
    if final.exists():  # e.g. the same step saved again after a rollback
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_dir(final.parent)


def _on_every_rank(main: Accelerator, work, staging: Path) -> None:
    """Run ``work`` on this rank; if it failed with an OSError on any rank, remove ``staging`` and
    raise the same CheckpointError everywhere (no rank is left waiting in a barrier)."""
    failure = None
    try:
        work()
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        failure = err
    failures = [f for f in gather_object([_describe_failure(failure, staging)]) if f]
    if failures:
        if main.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        newest = list_checkpoints(staging.parent.parent)
        raise CheckpointError(f"{failures[0]}; {newest[-1] if newest else 'no checkpoint'} stays the "
                              "newest complete checkpoint") from failure


def _describe_failure(err: Exception | None, staging: Path) -> str | None:
    if err is None:
        return None
    full = getattr(err, "errno", None) == errno.ENOSPC or shutil.disk_usage(staging.parent).free < DISK_FULL_BYTES
    if full:
        return f"no space left on {mount_point(staging)} while writing checkpoint {staging.name[:-4]}"
    if isinstance(err, RuntimeError) and not isinstance(err, OSError) and "write" not in str(err).lower():
        raise err  # not a failed write: a bug, with its traceback
    return f"cannot write checkpoint {staging.name[:-4]}: {err}"


def read_manifest(path: Path, checksums: bool = True) -> dict:
    """The manifest of checkpoint ``path``, after checking every file it lists is there, whole
    (sizes, and CRC-32s unless ``checksums`` is false: the caller verified them moments ago)."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: an interrupted save, not a checkpoint")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_file} is not valid JSON: {err}") from err
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_file}: unknown format {manifest.get('format')!r} "
                              f"(expected {MANIFEST_FORMAT})")
    damaged = []
    # absent in checkpoints written before checksums
    expected_crc = manifest.get("crc32", {}) if checksums else {}
    for name, size in manifest["files"].items():
        file = path / name
        if not file.is_file():
            damaged.append(f"  {name}: missing")
        elif file.stat().st_size != size:
            damaged.append(f"  {name}: {file.stat().st_size} bytes, manifest says {size}")
        elif name in expected_crc and (crc := crc32_of(file)) != expected_crc[name]:
            damaged.append(f"  {name}: CRC-32 {crc}, manifest says {expected_crc[name]}")
    if damaged:
        raise CheckpointError(f"checkpoint {path} is damaged:\n" + "\n".join(damaged))
    return manifest


# What a checkpoint's pickles may name beyond torch's weights_only set: NumPy arrays (Accelerate's
# RNG states) and the backends' plain state classes. Some backends unpickle their files with
# weights_only=False, so every pickle of a checkpoint is scanned before anything loads it.
SAFE_PICKLE_GLOBALS = frozenset({
    "numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
    *BACKEND_PICKLE_GLOBALS,
})
PICKLE_SUFFIXES = (".pt", ".pkl", ".bin", ".pth")


def refuse_code_in_pickles(path: Path) -> None:
    """Raise CheckpointError if a pickle under ``path`` names anything but tensors, plain data,
    NumPy arrays and DeepSpeed's state classes: such a file could run code when it is loaded.
    The scan reads each file's pickle opcodes; nothing is unpickled."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    for file in (f for f in files if f.is_file()):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception as err:  # not a torch.save zip: a bare pickle, a damaged file
            raise CheckpointError(f"checkpoint file {file} is not a torch.save archive ({err}); refused "
                                  "unread") from None
        unsafe = [n for n in names if n not in SAFE_PICKLE_GLOBALS and not n.startswith("numpy.dtypes.")]
        if unsafe:
            raise CheckpointError(f"checkpoint file {file} names {', '.join(unsafe[:3])}: a checkpoint "
                                  "holds tensors, numbers and NumPy arrays only, and loading this file "
                                  "could run code; refused unread")


def load_checkpoint(accelerators: dict[str, Accelerator], path: Path, config: Config,
                    verified: bool = False) -> dict:
    """Restore models, optimisers, scalers and RNG from ``path``; return the loop state.

    ``verified``: ``path`` came from ``resolve_resume("auto")`` or ``last_healthy``, which checked
    its checksums already; only sizes are checked again (reading every file twice is not free).
    """
    main = next(iter(accelerators.values()))
    manifest = read_manifest(path, checksums=not verified)
    check_compatible(path, config)
    check_resumable(path, manifest, main)
    refuse_code_in_pickles(path)
    for name, accelerator in accelerators.items():
        accelerator.load_state(str(path / name))
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)


def load_generator_state(path: Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The generator's weights from a checkpoint: the EMA copy, or the trained (raw) ones."""
    read_manifest(path)
    if ema:
        refuse_code_in_pickles(path / TRAINER_STATE)
        state = ema_weights(torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True))
        if state is not None:
            return state
        log.warning("%s has no EMA weights (train.ema_kimg or train.ema_decay was 0); using the raw "
                    "generator", path)
    from safetensors.torch import load_file

    return load_file(path / GENERATOR_WEIGHTS)


def load_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    """A VAE-GAN checkpoint's encoder weights."""
    read_manifest(path)
    if not (path / ENCODER_WEIGHTS).is_file():
        raise CheckpointError(f"{path} has no {ENCODER_WEIGHTS}: not a VAE-GAN (model.encoder) run")
    from safetensors.torch import load_file

    return load_file(path / ENCODER_WEIGHTS)


def check_compatible(path: Path, config: Config) -> None:
    """Refuse a checkpoint made for other network shapes, naming the keys that differ."""
    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        raise CheckpointError(f"{path} has no config.yaml: not a dist_gan checkpoint")
    saved, current = _flatten(yaml.safe_load(saved_file.read_text())), _flatten(to_dict(config))
    differ = [
        f"  {key}: checkpoint {saved.get(key)!r}, config {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key.startswith(SHAPE_KEYS) and saved.get(key) != current.get(key)
    ]
    if differ:
        raise CheckpointError(f"checkpoint {path} was made for another model:\n" + "\n".join(differ))
    batch = [f"{key}={current.get(key)!r} (the checkpoint has {saved.get(key)!r})" for key in BATCH_KEYS
             if key in saved and saved.get(key) != current.get(key)]
    if batch:
        raise CheckpointError(f"cannot resume {path} with {', '.join(batch)}: its step count, kimg and data "
                              "position are in its own batches; keep them, or start a new run.dir")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
