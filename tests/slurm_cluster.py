"""Helpers the Slurm tests share: a real cluster started by tests/slurm/cluster.sh, and job control."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import FAST, REPO, missing_prerequisite, wait_for

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
NO_NETWORK_NAMESPACES = 3  # cluster.sh start2's exit status where namespaces cannot be made


def run_cluster(tmp_path_factory, command: str):
    """Yield the environment for Slurm commands on a cluster `cluster.sh COMMAND` starts; stop its
    daemons (by pid) and remove what it made afterwards. Skips, saying why, where that cannot work."""
    if os.geteuid() != 0:
        missing_prerequisite("a test Slurm cluster needs root (slurmd, munged as the munge user)")
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if missing:
        missing_prerequisite(f"Slurm is not installed ({', '.join(missing)} missing): "
                    "bash tests/slurm/cluster.sh install")
    state = tmp_path_factory.mktemp("slurm")
    try:
        started = subprocess.run(["bash", str(CLUSTER), command, str(state)], capture_output=True,
                                 text=True, timeout=120)
        if started.returncode == NO_NETWORK_NAMESPACES:
            missing_prerequisite(f"two Slurm nodes need network namespaces: {started.stderr.strip()}")
        assert started.returncode == 0, started.stdout + started.stderr
        yield dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1",
                   PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=120)


def squeue_state(env: dict, job: str) -> str:
    """The job's state and reason; "" once Slurm has no such job in its queue. A failing squeue is
    not "" (it says why), so a wait for the job to leave the queue cannot end on a broken controller."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return f"squeue failed: {out.stderr.strip()}"
    return out.stdout.strip()


def show_job(env: dict, job: str, attempts: int = 5) -> str:
    """`scontrol show job JOB`, retried over a few seconds: a controller busy with the end of a job
    can fail one call. The last failure is raised with the tail of slurmctld's log."""
    for attempt in range(attempts):
        shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
        if shown.returncode == 0:
            return shown.stdout
        time.sleep(1 + attempt)
    log = Path(env["SLURM_CONF"]).parent / "slurmctld.log"
    tail = log.read_text(errors="replace").splitlines()[-30:] if log.is_file() else ["(no slurmctld.log)"]
    raise AssertionError(f"scontrol show job {job} failed {attempts} times: {shown.stderr.strip()}\n"
                         + "\n".join(tail))


def submit(env: dict, tmp_path: Path, run_dir: Path, data: list[str], *overrides: str,
           sbatch_args: tuple[str, ...] = ()) -> tuple[str, Path]:
    """sbatch slurm/train.sbatch on configs/mnist_wgangp.yaml (small and fast) reading ``data``
    (the shard_data fixture: shards with loader workers, as users run); the job id and log."""
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path / '%x-%j.log'}", *sbatch_args, "slurm/train.sbatch",
         "configs/mnist_wgangp.yaml", *data, *FAST, *overrides],
        cwd=REPO, env=dict(env, RUN_DIR=str(run_dir)), capture_output=True, text=True, check=True)
    job = out.stdout.strip().split(";")[0]
    return job, tmp_path / f"dist_gan-{job}.log"


def preempt_and_release(env: dict, job: str) -> None:
    """USR1 to the batch shell, as Slurm sends before a time limit; wait for the requeue and let the
    requeued job start at once instead of after Slurm's hold of about two minutes."""
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    wait_for(lambda: squeue_state(env, job) == "PENDING BeginTime", 120, "the requeue", interval=0.5)
    time.sleep(5)  # releasing before the old credential expires fails ("credential revoked")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
