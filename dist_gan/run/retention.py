"""Which checkpoints a run keeps, resumes from and rolls back to: pruning to ``run.keep_last`` (and
the newest healthy one), ``train.resume`` (auto: the newest that verifies), the rollback target, the
best-FID copy, and the clean-up after a killed save. What a checkpoint is, and how it is written and
read, is ``checkpoint``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from dist_gan.core.fsutil import fsync_dir, fsync_tree
from dist_gan.run.checkpoint import MANIFEST, CheckpointError, checkpoint_root, list_checkpoints, read_manifest

log = logging.getLogger(__name__)

BEST = "best"


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
    fsync_tree(staging)
    if best.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(best, old)
    os.replace(staging, best)
    fsync_dir(best.parent)
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
