"""The run directory as a resource: one run at a time (its lock), a fresh run never writing over
another run's checkpoints, and ``run.overwrite`` deleting the earlier run only once the new one
stands (its first checkpoint): until then the earlier run's files wait in ``RUN_DIR/.overwritten``,
and a start that fails puts them back."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from dist_gan.config import Config, ConfigError
from dist_gan.run import runlock
from dist_gan.run.checkpoint import checkpoint_step, list_checkpoints
from dist_gan.run.retention import resolve_resume

log = logging.getLogger(__name__)


def lock_run_dir(accelerator: Accelerator, run_dir: Path) -> Path | None:
    """Rank 0 takes the run directory's lock; every rank raises RunDirInUse if it could not (another
    run holds it, or the directory cannot be written: read-only, a full disk)."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = runlock.acquire(run_dir)
        except runlock.RunDirInUse as err:
            refusal = str(err)
        except OSError as err:
            refusal = f"cannot write run.dir {run_dir}: {err.strerror or err}; choose another --run.dir"
    refusals = [r for r in gather_object([refusal]) if r]
    if refusals:
        raise runlock.RunDirInUse(refusals[0])
    return lock


ASIDE = ".overwritten"
# What stays in place when an earlier run is set aside: the lock of this run, and shards written
# from data.folder (data, not the earlier run's results: reused when the folder is unchanged).
KEPT_IN_PLACE = (runlock.LOCK_NAME, "shards", ASIDE)


@dataclass
class SetAside:
    """An earlier run's files moved to ``run_dir/.overwritten`` while a new run starts there."""

    run_dir: Path
    active: bool = True

    @property
    def folder(self) -> Path:
        return self.run_dir / ASIDE

    def discard(self) -> None:
        """The new run stands (it wrote a checkpoint): delete the earlier run for good."""
        if self.active:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.active = False
            log.info("run.overwrite: the earlier run in %s is deleted", self.run_dir)

    def restore(self) -> None:
        """The new run failed before its first checkpoint: remove what it wrote, put the earlier
        run back as it was."""
        if not self.active:
            return
        self.active = False
        if not self.folder.is_dir():
            return
        for entry in _movable(self.run_dir):
            _remove(entry)
        for entry in self.folder.iterdir():
            entry.rename(self.run_dir / entry.name)
        self.folder.rmdir()
        log.warning("run.overwrite: this run stopped before its first checkpoint; the earlier run in "
                    "%s is back as it was", self.run_dir)


def _movable(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.name not in KEPT_IN_PLACE)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def set_aside(run_dir: Path) -> SetAside:
    """Move every file of ``run_dir`` but the lock (and data.folder's shards) to ``.overwritten``."""
    aside = SetAside(run_dir)
    aside.folder.mkdir()
    for entry in _movable(run_dir):
        entry.rename(aside.folder / entry.name)
    return aside


def settle_interrupted_overwrite(run_dir: Path) -> None:
    """A run killed while an earlier run was set aside: if it had written a checkpoint the earlier
    run is deleted, as it would have been; otherwise the earlier run is put back."""
    if (run_dir / ASIDE).is_dir():
        aside = SetAside(run_dir)
        aside.discard() if list_checkpoints(run_dir) else aside.restore()


def claim_run_dir(config: Config, accelerator: Accelerator) -> tuple[Path | None, SetAside | None]:
    """(The checkpoint to resume from (None: start fresh), the earlier run set aside by
    ``run.overwrite`` or None), once the run directory may be used: a fresh run never writes over
    another run's checkpoints (unless ``run.overwrite``), and a resume that would train no step
    changes nothing. Raises ConfigError naming the way out."""
    run_dir = Path(config.run.dir)
    if accelerator.is_main_process and run_dir.is_dir():
        settle_interrupted_overwrite(run_dir)
    accelerator.wait_for_everyone()
    resume_from = resolve_resume(config.train.resume, run_dir)
    if resume_from is not None:
        at = checkpoint_step(resume_from)
        if at >= config.train.max_steps:
            raise ConfigError(f"checkpoint {resume_from} is at step {at} and train.max_steps="
                              f"{config.train.max_steps}: there is nothing to train (the run was left "
                              "as it is); raise train.max_steps to continue it")
        return resume_from, None
    existing = list_checkpoints(run_dir)
    if existing and not config.run.overwrite:
        raise ConfigError(f"run.dir {run_dir} holds another run's checkpoints (newest {existing[-1].name}): "
                          "continue it with --train.resume=auto, or start afresh with --run.overwrite=true "
                          "(deletes them once the new run has its first checkpoint) or another --run.dir")
    aside = None
    if existing:
        if accelerator.is_main_process:
            aside = set_aside(run_dir)
            log.warning("run.overwrite: the earlier run in %s (%d checkpoint(s), its metrics, samples and "
                        "events) is set aside in %s: deleted at this run's first checkpoint, put back if "
                        "it stops before", run_dir, len(existing), aside.folder)
        accelerator.wait_for_everyone()
    return None, aside
