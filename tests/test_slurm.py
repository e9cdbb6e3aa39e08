"""slurm/train.sbatch on a real one-node Slurm cluster (slurmctld + slurmd + munged on localhost).

.ci/run installs Slurm; without root or the packages these tests skip, saying why. The cluster is
started once for the module by tests/slurm/cluster.sh and its daemons are stopped by pid afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, read_metrics, wait_for

pytestmark = pytest.mark.slow
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment for Slurm commands talking to a cluster started for this module."""
    if os.geteuid() != 0:
        pytest.skip("a test Slurm cluster needs root (slurmd, munged as the munge user)")
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): "
                    "bash tests/slurm/cluster.sh install")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                             timeout=120)
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=120)


def squeue_state(env: dict, job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True,
                         text=True)
    return out.stdout.strip()


def submit(env: dict, tmp_path: Path, run_dir: Path, mnist_dir: Path, *overrides: str) -> tuple[str, Path]:
    log_pattern = tmp_path / "%x-%j.log"
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={log_pattern}", "slurm/train.sbatch",
         "configs/mnist_wgangp.yaml", "--data.format=memory", f"--data.mnist_dir={mnist_dir}",
         *FAST, *overrides],
        cwd=REPO, env=dict(env, RUN_DIR=str(run_dir)), capture_output=True, text=True, check=True)
    job = out.stdout.strip().split(";")[0]
    return job, tmp_path / f"dist_gan-{job}.log"


def test_sbatch_trains_on_two_cpu_processes(slurm, tmp_path, mnist_dir):
    run = tmp_path / "run"
    job, log = submit(slurm, tmp_path, run, mnist_dir, "--train.max_steps=10", "--run.ckpt_every=10")
    wait_for(lambda: squeue_state(slurm, job) == "", 300, f"job {job} to finish", interval=1)
    text = log.read_text()
    assert "1 node(s) x 2 process(es), launch/cpu_ddp.yaml" in text
    assert "training finished with status 0" in text, text[-3000:]
    start = [r for r in read_metrics(run) if r.get("event") == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2
    assert (run / "checkpoints" / "step_00000010" / "manifest.json").is_file()
    assert list(run.glob("events.out.tfevents.*"))


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path, mnist_dir):
    run = tmp_path / "run"
    job, log = submit(slurm, tmp_path, run, mnist_dir, "--train.max_steps=150", "--run.ckpt_every=1000")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3, 300,
             "the first log lines", interval=0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    # Slurm holds a requeued job for about two minutes (BeginTime) so the old credential expires;
    # once that has happened (a few seconds), release it early to keep the test short.
    wait_for(lambda: squeue_state(slurm, job) == "PENDING BeginTime", 120, "the requeue", interval=0.5)
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    wait_for(lambda: squeue_state(slurm, job) == "", 400, "the requeued job to finish", interval=1)

    text = log.read_text()
    assert "USR1 received: asking the training processes to checkpoint" in text
    assert f"requeueing job {job}" in text and f"job {job} restart 1" in text, text[-3000:]
    assert "training finished with status 0" in text
    records = read_metrics(run)
    stop = [r for r in records if r.get("event") == "preempted"]
    assert len(stop) == 1 and stop[0]["stopped_by"] == "SIGTERM"
    step = stop[0]["step"]
    assert 0 < step < 150
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"].endswith(f"step_{step:08d}")
    assert starts[1]["step"] == step
    assert [r for r in records if r.get("event") == "end"][-1]["step"] == 150
    logged = [r["step"] for r in records if "loss_D" in r]
    assert logged == sorted(set(logged))  # the resumed job went on from the step, not from zero
    restarts = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True,
                              text=True).stdout
    assert re.search(r"Restarts=1\b", restarts)
