"""Checkpoints: one folder per step, written so that a crash never leaves a half checkpoint that looks
whole, and loaded only after checking it is whole and made for this model.

Layout of RUN_DIR/checkpoints/step_00000040/:
  G/, D/                 each network's ``accelerator.save_state``: weights once (model.safetensors,
                         or DeepSpeed's pytorch_model/ with one ZeRO optimizer partition per rank),
                         optimizer, grad scaler, and random_states_<rank>.pkl from every rank
  generator.safetensors  G's weights, for sampling without Accelerate or DeepSpeed
  encoder.safetensors    VAE-GAN only: the encoder's, for reconstructions
  trainer_state.pt       step, schedulers, EMA weights, each rank's data-stream position
                         (plain tensors and numbers: loads with torch.load(weights_only=True))
  config.yaml            the resolved config the checkpoint was made with
  manifest.json          written last: every file with its size and CRC-32, the step, world size,
                         backend, and ``healthy`` (no skipped non-finite update since the previous
                         checkpoint, every weight finite): only a healthy checkpoint is a rollback target

Every rank writes into ``step_N.tmp``; after a barrier rank 0 adds the rest, fsyncs it all, writes
the manifest and renames the folder into place. A kill at any moment leaves either the old set of
checkpoints or the new one; a folder without a manifest, or whose files disagree with it, is never
loaded; nor is one whose files fail their checksum (``resume=auto`` then takes the newest one that
verifies). Pruning keeps the newest ``run.keep_last`` and always the newest healthy one. A save that
fails (a full disk) removes its staging folder on every rank and raises one CheckpointError, so the
previous checkpoint stays the newest complete one. The folder must be on storage every rank sees (a
shared filesystem on a cluster).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object

from dist_gan.backend import BACKEND_PICKLE_GLOBALS, check_resumable
from dist_gan.config import Config, ConfigError, save_config, to_dict
from dist_gan.data.shards import mount_point

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dist_gan.checkpoint/1"
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


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a complete checkpoint, else the newest complete one of run ``path``."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such checkpoint or run directory: {path}")
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint (no {MANIFEST}: an "
                                "interrupted save?) nor a run directory holding one")
    return found[-1]


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint to load for ``train.resume`` (None, "auto" or a path), or None to start fresh.

    "auto" takes the newest checkpoint that verifies (files, sizes, checksums), logging each newer
    one it skipped and why. A path is loaded as given (and refused if it does not verify).
    """
    if resume is None:
        return None
    if resume == "auto":
        found = newest_verified(list_checkpoints(run_dir))
        if found is None:
            log.info("train.resume=auto: no complete checkpoint in %s; starting fresh",
                     checkpoint_root(run_dir))
        return found
    return find_checkpoint(resume)


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint was saved at (from its manifest)."""
    try:
        return int(json.loads((path / MANIFEST).read_text())["step"])
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path / MANIFEST} cannot be read: {err}") from None


def newest_verified(candidates: list[Path]) -> Path | None:
    """The last of ``candidates`` (oldest first) that passes ``read_manifest``; warns about the rest."""
    for path in reversed(candidates):
        try:
            read_manifest(path)
            return path
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", path, err)
    return None


def is_healthy(path: Path) -> bool:
    """Whether checkpoint ``path`` was written with no non-finite update since the one before it
    (checkpoints from before this flag existed count as healthy)."""
    try:
        return bool(json.loads((path / MANIFEST).read_text()).get("healthy", True))
    except (OSError, json.JSONDecodeError):
        return False


def last_healthy(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that is healthy and verifies: where a divergence rollback goes."""
    return newest_verified([p for p in list_checkpoints(run_dir) if is_healthy(p)])


def remove_stale_staging(run_dir: str | Path) -> None:
    """Delete ``step_N.tmp`` folders left by a save that was killed (call on the main process)."""
    for stale in checkpoint_root(run_dir).glob("step_*.tmp"):
        log.warning("removing %s: an interrupted checkpoint save", stale)
        shutil.rmtree(stale, ignore_errors=True)


BEST = "best"


def best_checkpoint(run_dir: str | Path) -> Path:
    return checkpoint_root(run_dir) / BEST


def keep_as_best(checkpoint: Path) -> Path:
    """Make ``checkpoint`` the run's ``checkpoints/best`` (call on the main process).

    Its files are hard-linked (copied where the filesystem has no hard links) into ``best.tmp``,
    which then replaces ``best``: the old best is renamed aside first and removed last, so at every
    moment a complete best exists under one of the two names (``restore_best`` puts it back).
    ``best`` is not a ``step_*`` folder, so pruning and ``resume=auto`` never see it."""
    best = best_checkpoint(checkpoint.parent.parent)
    staging, old = best.with_name(BEST + ".tmp"), best.with_name(BEST + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging, copy_function=_link_or_copy)
    _fsync_tree(staging)
    if best.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(best, old)
    os.replace(staging, best)
    _fsync_dir(best.parent)
    shutil.rmtree(old, ignore_errors=True)
    return best


def restore_best(run_dir: str | Path) -> None:
    """After a kill inside ``keep_as_best``: the old best back under its name, the staging gone."""
    best = best_checkpoint(run_dir)
    old, staging = best.with_name(BEST + ".old"), best.with_name(BEST + ".tmp")
    if old.is_dir() and not best.exists():
        os.replace(old, best)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class ReplicasDiffer(RuntimeError):
    """The ranks' copies of a network differ at a checkpoint (DDP's invariant broke)."""


def save_checkpoint(accelerators: dict[str, Accelerator], run_dir: str | Path, step: int,
                    shared_state: dict, rank_state: dict, weights: dict[str, nn.Module],
                    config: Config, healthy: bool = True,
                    replicas_agree: Callable[[], dict[str, bool]] | None = None) -> Path:
    """Save everything needed to continue at ``step``; then keep only the newest ``run.keep_last``
    (and the newest healthy one).

    ``accelerators`` maps a folder name to the Accelerator whose models it holds; ``shared_state`` is
    the loop state (same on every rank), ``rank_state`` this rank's own part (its data position);
    ``weights`` the plain networks to write as ``<name>.safetensors`` for sampling (the generator, and
    the encoder of a VAE-GAN); ``healthy`` whether this checkpoint may be a rollback target. Every
    rank must call this; if any rank fails to write (a full disk), every rank raises CheckpointError
    and the staging folder is removed. ``replicas_agree`` (a collective: same answer on every rank)
    runs once the states are written and before the manifest: if the ranks' weights differ, every
    rank raises ReplicasDiffer and the checkpoint stays an incomplete staging folder, which no
    resume or rollback ever loads.
    """
    main = next(iter(accelerators.values()))
    final = checkpoint_root(run_dir) / f"step_{step:08d}"
    staging = final.with_name(final.name + ".tmp")

    def make_staging() -> None:
        if main.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

    def save_states() -> None:
        for name, accelerator in accelerators.items():
            accelerator.save_state(str(staging / name))

    _on_every_rank(main, make_staging, staging)
    _on_every_rank(main, save_states, staging)
    rank_states = gather_object([rank_state])
    main.wait_for_everyone()
    agreed = replicas_agree() if replicas_agree is not None else {}
    if not all(agreed.values()):
        differ = ", ".join(name for name, same in agreed.items() if not same)
        raise ReplicasDiffer(f"ranks disagree on the weights of {differ} at step {step}: the checkpoint "
                             f"was left incomplete in {staging} (no manifest: never resumed from)")

    def finish_on_main() -> None:
        if not main.is_main_process:
            return
        from safetensors.torch import save_file

        for name, module in weights.items():
            tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(tensors, staging / f"{name}.safetensors")
        torch.save({**shared_state, "ranks": rank_states, "world_size": main.num_processes},
                   staging / TRAINER_STATE)
        save_config(config, staging / "config.yaml")
        _fsync_tree(staging)
        files = sorted(f for f in staging.rglob("*") if f.is_file())
        manifest = {
            "format": MANIFEST_FORMAT, "step": step, "world_size": main.num_processes,
            "distributed_type": str(main.distributed_type), "healthy": healthy,
            "files": {str(f.relative_to(staging)): f.stat().st_size for f in files},
            "crc32": {str(f.relative_to(staging)): file_crc32(f) for f in files},
        }
        _write_synced(staging / MANIFEST, json.dumps(manifest, indent=1))
        _fsync_dir(staging)
        if final.exists():  # e.g. the same step saved again after a rollback
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(final.parent)

    _on_every_rank(main, finish_on_main, staging)
    if main.is_main_process:
        prune_checkpoints(run_dir, config.run.keep_last)
    main.wait_for_everyone()
    return final


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


def file_crc32(path: Path) -> str:
    """CRC-32 of a file as 8 hex digits (about 2 GB/s; docs/scale.md has the measured cost)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` (>= 1) complete checkpoints and the newest healthy
    one; return what was deleted.

    Only complete checkpoints count and only they are deleted, so the newest complete one survives
    whatever else lies there (interrupted saves are cleaned up by ``remove_stale_staging``); the
    newest healthy one survives a streak of unhealthy ones, so a rollback always has a target."""
    found = list_checkpoints(run_dir)
    healthy = [p for p in found if is_healthy(p)]
    keep = set(found[-max(keep_last, 1):]) | set(healthy[-1:])
    doomed = [p for p in found if p not in keep]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


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
        elif name in expected_crc and (crc := file_crc32(file)) != expected_crc[name]:
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
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True).get("ema")
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


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(folder)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def position_for_rank(state: dict, rank: int, world: int) -> dict:
    """This rank's data-stream position from a checkpoint; re-derived when the world size changed.

    Same world size: the rank's own saved position (exact). Otherwise rank 0's epoch and the same
    share of it consumed (batches x old world / new world): the order of the rest of that epoch
    differs from an uninterrupted run, which cannot be helped when ranks split the data differently.
    """
    ranks, saved_world = state["ranks"], int(state["world_size"])
    if saved_world == world:
        return ranks[rank]
    first = ranks[0]
    return {"epoch": int(first["epoch"]), "batch": int(first["batch"]) * saved_world // world}


@dataclass
class SavePolicy:
    """When the loop saves: every ``every`` steps, at the run's last step, at an evaluation step whose
    FID is the best so far (``run.keep_best``), and at the first step after a bad streak that deferred
    a save; never while the divergence guard's bad streak is open (the save is owed instead)."""

    every: int
    evaluate_every: int = 0  # keep_best's evaluation steps may save
    owed: bool = False

    def may_save(self, step: int, last: bool) -> bool:
        """Whether ``step`` might save, so the guard must review it first."""
        evaluation = self.evaluate_every > 0 and step % self.evaluate_every == 0
        return step % self.every == 0 or last or self.owed or evaluation

    def save_now(self, step: int, last: bool, best_due: bool, streak_open: bool) -> bool:
        """Whether to save at ``step``; a save wanted during a bad streak is owed until it ends."""
        wanted = step % self.every == 0 or last or self.owed or best_due
        if wanted and streak_open:
            log.warning("step %d: checkpoint deferred until the divergence guard's bad streak ends%s",
                        step, "; stopping without one" if last else "")
            self.owed = True
            return False
        self.owed = False if wanted else self.owed
        return wanted

    def rolled_back(self) -> None:
        self.owed = False
