"""Real runs at world sizes other than 2 on the default MNIST shards (6 shards of 10,000): 8 processes
(more ranks than shards) and 3 (a world size that divides nothing), through `accelerate launch`."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FAST, run_cli
from helpers import CPU_DDP, assert_same_weights, events, kill_and_resume

pytestmark = pytest.mark.tier("e2e")  # every tier but unit is also slow (conftest)


def launch(processes: int) -> list[str]:
    return [*CPU_DDP, "--num_processes", str(processes)]


def args(run: Path, shards: str, *extra: str) -> list[str]:
    return ["dist_gan.train", "configs/mnist_dcgan.yaml", f"--run.dir={run}", *FAST,
            f"--data.shards={shards}", "--data.prepare_if_missing=false", *extra]


def test_eight_processes_on_six_shards(tmp_path, mnist_shards):
    run = tmp_path / "eight"
    proc = run_cli(args(run, mnist_shards, "--train.max_steps=3", "--run.ckpt_every=3", "--data.workers=1"),
                   launch(8), timeout=900)
    start = events(run, "start")[0]
    assert start["world_size"] == 8 and start["effective_batch"] == 8 * 32
    # 60,000 samples over 8 readers: 7,500 each, 234 batches of 32 (some of 33), every sample read
    assert "8 ranks x 1 readers, 234 batches per rank per epoch, 100.0% of the samples" in proc.stderr
    [check] = events(run, "checkpoint")
    assert check["step"] == 3 and check["replicas_identical"] == {"G": True, "D": True}


@pytest.mark.tier("cluster")
def test_three_processes_killed_and_resumed_bit_exact(tmp_path, mnist_shards):
    """3 ranks x 2 workers: 12 steps straight == killed (SIGKILL to every process) after the step-6
    checkpoint, then resumed: the data position is sought, not replayed, and lands on the same batches."""
    common = ["--train.max_steps=12", "--run.ckpt_every=6", "--run.log_every=1", "--data.workers=2"]
    run_cli(args(tmp_path / "straight", mnist_shards, *common), launch(3), timeout=900)
    assert events(tmp_path / "straight", "start")[0]["world_size"] == 3
    killed = tmp_path / "killed"
    # step 7 logged: the step-6 checkpoint is complete, and 5 steps remain before the end; every rank
    # and loader worker is killed at once, as in a node failure
    kill_and_resume(args(killed, mnist_shards, *common), killed, launch=launch(3), kill_after=7, resumes_from=6,
                    end=12, timeout=900)
    assert_same_weights(tmp_path / "straight" / "checkpoints" / "step_00000012",
                        killed / "checkpoints" / "step_00000012")
