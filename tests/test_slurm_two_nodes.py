"""Jobs on two Slurm nodes on this machine: DDP with pre-emption and requeue, and DeepSpeed.

tests/slurm/cluster.sh start2 runs each node's slurmd in a network namespace of its own, so the two
ranks of the job meet over a (virtual) network, at the first node's NodeAddr, as on a cluster.
Skips, saying why, without root, Slurm or network namespaces.
"""

from __future__ import annotations

import json

import pytest

from conftest import read_metrics, wait_for
from slurm_cluster import preempt_and_release, run_cluster, show_job, squeue_state, submit

pytestmark = pytest.mark.tier("cluster")  # every tier but unit is also slow (conftest)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    # gloo picks the interface of the host name by default, which the namespaces do not have
    for env in run_cluster(tmp_path_factory, "start2"):
        yield dict(env, GLOO_SOCKET_IFNAME="gan0", CPU_PROCS_PER_NODE="1")


def test_two_node_job_trains_preempts_requeues_and_resumes(two_nodes, tmp_path, shard_data):
    env, run = two_nodes, tmp_path / "run"
    job, log = submit(env, tmp_path, run, shard_data, "--train.max_steps=120", "--run.ckpt_every=1000",
                      sbatch_args=("--nodes=2",))
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3, 300,
             "the first log lines", interval=0.5)
    preempt_and_release(env, job)
    wait_for(lambda: squeue_state(env, job) == "", 400, "the requeued job to finish", interval=1)

    text = log.read_text(errors="replace")  # a progress bar may be cut mid-character
    shown = show_job(env, job)
    assert " NodeList=dgnode[1-2]" in shown and " Restarts=1 " in shown, shown
    for restart in (0, 1):
        assert f"job {job} restart {restart}: 2 node(s) x 1 process(es)" in text, text[-3000:]
    assert "main 10.213.0.1:" in text  # the first node's own address, not this machine's name
    assert text.count("node 0 (dgnode1): starting 1 process(es)") == 2
    assert text.count("node 1 (dgnode2): starting 1 process(es)") == 2
    assert f"requeueing job {job}" in text and "training finished with status 0" in text

    records = read_metrics(run)
    starts = [r for r in records if r.get("event") == "start"]
    assert [s["world_size"] for s in starts] == [2, 2]
    stop = [r for r in records if r.get("event") == "preempted"]
    assert len(stop) == 1 and stop[0]["stopped_by"] == "SIGTERM"
    step = stop[0]["step"]
    assert 0 < step < 120 and starts[1]["step"] == step
    assert starts[1]["resumed_from"].endswith(f"step_{step:08d}")
    saved = [r for r in records if r.get("event") == "checkpoint"]
    assert saved and all(r["replicas_identical"] == {"G": True, "D": True} for r in saved)
    assert [r for r in records if r.get("event") == "end"][-1]["step"] == 120


def test_two_node_deepspeed_job(two_nodes, tmp_path, shard_data):
    """DeepSpeed ZeRO-2 in bf16 across the two nodes: one optimizer partition written per node."""
    env = dict(two_nodes, PROFILE="launch/deepspeed_zero2.yaml", DS_ACCELERATOR="cpu")
    run = tmp_path / "run"
    job, log = submit(env, tmp_path, run, shard_data, "--train.max_steps=6", "--run.ckpt_every=6",
                      "--train.mixed_precision=bf16", sbatch_args=("--nodes=2",))
    wait_for(lambda: squeue_state(env, job) == "", 400, f"job {job} to finish", interval=1)
    text = log.read_text(errors="replace")  # a progress bar may be cut mid-character
    assert "2 node(s) x 1 process(es), launch/deepspeed_zero2.yaml" in text, text[-3000:]
    assert "training finished with status 0" in text, text[-3000:]
    start = [r for r in read_metrics(run) if r.get("event") == "start"][0]
    assert start["distributed_type"] == "DistributedType.DEEPSPEED" and start["world_size"] == 2
    assert start["mixed_precision"] == "bf16"
    manifest = json.loads((run / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    for net in ("G", "D"):
        for rank in (0, 1):
            partition = f"{net}/pytorch_model/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            assert partition in manifest["files"]
