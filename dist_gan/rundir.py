"""The run directory as a resource: one run at a time (its lock), and a fresh run never writing over
another run's checkpoints."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from dist_gan import runlock
from dist_gan.checkpoint import checkpoint_root, checkpoint_step, list_checkpoints, resolve_resume
from dist_gan.config import Config, ConfigError

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


def claim_run_dir(config: Config, accelerator: Accelerator) -> Path | None:
    """The checkpoint to resume from (None: start fresh), once the run directory may be used:
    a fresh run never writes over another run's checkpoints (unless ``run.overwrite``), and a
    resume that would train no step changes nothing. Raises ConfigError naming the way out."""
    run_dir = Path(config.run.dir)
    resume_from = resolve_resume(config.train.resume, run_dir)
    if resume_from is not None:
        at = checkpoint_step(resume_from)
        if at >= config.train.max_steps:
            raise ConfigError(f"checkpoint {resume_from} is at step {at} and train.max_steps="
                              f"{config.train.max_steps}: there is nothing to train (the run was left "
                              "as it is); raise train.max_steps to continue it")
        return resume_from
    existing = list_checkpoints(run_dir)
    if existing and not config.run.overwrite:
        raise ConfigError(f"run.dir {run_dir} holds another run's checkpoints (newest {existing[-1].name}): "
                          "continue it with --train.resume=auto, or start afresh with --run.overwrite=true "
                          "(deletes them) or another --run.dir")
    if existing:
        if accelerator.is_main_process:
            log.warning("run.overwrite: deleting %d checkpoint(s) and metrics.jsonl of the earlier run in %s",
                        len(existing), run_dir)
            shutil.rmtree(checkpoint_root(run_dir))
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    return None
