"""slurm/train.sbatch on a real one-node Slurm cluster (slurmctld + slurmd + munged on localhost).

.ci/run installs Slurm; without root or the packages these tests skip, saying why. The cluster is
started once for the module by tests/slurm/cluster.sh and its daemons are stopped by pid afterwards.
"""

from __future__ import annotations

import re

import pytest

from conftest import read_metrics, wait_for
from slurm_cluster import preempt_and_release, run_cluster, show_job, squeue_state, submit

pytestmark = pytest.mark.tier("cluster")  # every tier but unit is also slow (conftest)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment for Slurm commands talking to a one-node cluster started for this module."""
    yield from run_cluster(tmp_path_factory, "start")


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path, shard_data):
    """sbatch slurm/train.sbatch trains on two CPU processes; USR1 (Slurm's warning before a time
    limit) makes it checkpoint and requeue itself, and the requeued job resumes from that step."""
    run = tmp_path / "run"
    job, log = submit(slurm, tmp_path, run, shard_data, "--train.max_steps=150", "--run.ckpt_every=1000")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3, 300,
             "the first log lines", interval=0.5)
    preempt_and_release(slurm, job)
    wait_for(lambda: squeue_state(slurm, job) == "", 400, "the requeued job to finish", interval=1)

    text = log.read_text(errors="replace")  # a progress bar may be cut mid-character
    assert "1 node(s) x 2 process(es), launch/cpu_ddp.yaml" in text
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
    assert [s["world_size"] for s in starts] == [2, 2]
    assert starts[1]["step"] == step
    assert [r for r in records if r.get("event") == "end"][-1]["step"] == 150
    logged = [r["step"] for r in records if "loss_D" in r]
    assert logged == sorted(set(logged))  # the resumed job went on from the step, not from zero
    assert (run / "checkpoints" / "step_00000150" / "manifest.json").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    restarts = show_job(slurm, job)
    assert re.search(r"Restarts=1\b", restarts)
