"""One run per run directory: a lock file naming the host and process that trains there.

Two runs writing one run directory interleave their metrics, overwrite each other's config and prune
each other's checkpoints. ``RUN_DIR/run.lock`` is created exclusively at start (by rank 0 only) and
removed at the end. A lock left by a process that no longer runs on this host, or by an earlier run
of the same Slurm job (a requeue after a hard kill, perhaps on another node), is taken over with a
warning; any other is refused with a one-line error naming the holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from dist_gan.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# A lock file still empty after this long was left by a process killed between create and write.
EMPTY_LOCK_GRACE_S = 10.0


class RunDirInUse(ConfigError):
    """Another live process trains in this run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _stale_reason(holder: dict | None, lock: Path) -> str | None:
    """Why the lock ``holder`` may be taken over, or None when it belongs to a live run."""
    if holder is None:
        age = time.time() - lock.stat().st_mtime
        return f"an unreadable lock {age:.0f}s old" if age > EMPTY_LOCK_GRACE_S else None
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"left by an earlier run of Slurm job {job} (requeued)"
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            return "taken earlier by this same process"
        if not _pid_alive(pid):
            return f"pid {pid} on this host is gone"
    return None


def _read(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def acquire(run_dir: str | Path) -> Path:
    """Take ``RUN_DIR/run.lock`` for this process or raise RunDirInUse naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):  # a lost race with another taker tries again
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(lock)
            reason = _stale_reason(holder, lock)
            if reason is None:
                who = (f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
                       if holder else "a process that is still writing its lock")
                raise RunDirInUse(f"run directory {run_dir} is in use by {who}: wait for it, stop it, "
                                  f"or pick another --run.dir (delete {lock} only if that run is gone)")
            log.warning("taking over %s: %s", lock, reason)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise RunDirInUse(f"could not take {lock}: other processes keep taking it")


def release(lock: Path) -> None:
    """Remove ``lock`` if this process still holds it."""
    holder = _read(lock)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)
