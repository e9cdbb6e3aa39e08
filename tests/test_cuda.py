"""The CUDA paths: mixed precision, compile and memory format on a GPU, DDP over NCCL, resume.

Skipped without a GPU; ``bench/gpu_check.sh`` runs them on a lent one. They need no dataset (the
synthetic source), since a GPU machine may have none.
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import read_metrics, run_cli

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
SYNTHETIC = ["--data.source=synthetic", "--data.format=memory", "--run.log_every=5"]


def train(run_dir, *extra, launcher=None):
    return run_cli(["dist_gan.train", "configs/mnist_wgangp.yaml", f"--run.dir={run_dir}", *SYNTHETIC,
                    *extra], launcher=launcher)


def logged(run_dir):
    return [r for r in read_metrics(run_dir) if "loss_D" in r]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_gpu(tmp_path, precision):
    run = tmp_path / precision
    train(run, "--train.max_steps=20", f"--train.mixed_precision={precision}")
    start = [r for r in read_metrics(run) if r.get("event") == "start"][0]
    assert start["device"].startswith("cuda") and start["mixed_precision"] == precision
    records = logged(run)
    assert records[-1]["step"] == 20
    assert all(r["loss_D"] is not None and r["gp"] is not None for r in records)  # finite
    assert records[-1]["skipped_steps"] <= 2  # fp16: the scaler may skip its first steps, not more


def test_compile_and_channels_last_on_gpu(tmp_path):
    run = tmp_path / "compiled"
    train(run, "--train.max_steps=10", "--train.mixed_precision=bf16", "--speed.compile=true",
          "--speed.channels_last=true", "--speed.adam_impl=fused")
    assert logged(run)[-1]["step"] == 10


def test_ddp_over_nccl_with_one_process_and_resume(tmp_path):
    run = tmp_path / "nccl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    train(run, "--train.max_steps=10", "--run.ckpt_every=5", launcher=torchrun)
    start = [r for r in read_metrics(run) if r.get("event") == "start"][0]
    assert start["distributed_type"] == "DistributedType.MULTI_GPU"
    train(run, "--train.max_steps=15", "--train.resume=auto", launcher=torchrun)
    assert [r for r in read_metrics(run) if r.get("event") == "start"][1]["resumed_from"].endswith(
        "step_00000010")
    assert logged(run)[-1]["step"] == 15
