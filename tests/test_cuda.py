"""The CUDA paths: mixed precision, compile and memory format on a GPU, DDP over NCCL, resume.

Skipped without a GPU; ``bench/gpu_check.sh`` runs them on a lent one. They need no dataset (the
synthetic source), since a GPU machine may have none.
"""

from __future__ import annotations

import math
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
    common = ["--train.max_steps=10", "--train.mixed_precision=bf16", "--speed.channels_last=true",
              "--speed.adam_impl=fused", "--run.log_every=5"]
    train(run, *common, "--speed.compile=true")
    eager_run = tmp_path / "eager"
    train(eager_run, *common, "--speed.compile=false")
    compiled, eager = logged(run), logged(eager_run)
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [5, 10]
    for a, b in zip(compiled, eager):  # compiled steps train like eager ones (bf16: loosely)
        assert math.isfinite(a["loss_D"]) and math.isfinite(a["gp"]) and a["skipped_steps"] == 0
        assert abs(a["loss_D"] - b["loss_D"]) < 0.1 * max(1.0, abs(b["loss_D"]))


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


def test_steps_between_log_steps_never_sync_the_gpu():
    """train_step plus the loop's per-step bookkeeping under torch's sync debugger: any
    device-to-host wait in them raises (tests/test_syncs.py counts the same on CPU)."""
    from accelerate.utils import set_seed

    from dist_gan.config import load_config
    from dist_gan.losses import build_loss
    from dist_gan.run import backend
    from dist_gan.run.guard import StepTally
    from dist_gan.run.nets import build_nets
    from dist_gan.run.step import StatsWindow, train_step

    config = load_config("configs/mnist_wgangp.yaml", {
        "data.batch_size": 32, "model.generator.width": 16, "model.discriminator.width": 16,
        "train.mixed_precision": "bf16", "optim.accumulate": 2})
    acc_G, acc_D = backend.make_accelerators(config)
    nets = build_nets(config, acc_G, acc_D)
    device = acc_G.device

    class OnDevice:  # batches already on the GPU: the step, not the copy, is under test
        def __init__(self):
            self.batches = [(torch.rand(32, 1, 28, 28, device=device) * 2 - 1,
                             torch.zeros(32, dtype=torch.long, device=device)) for _ in range(4)]
            self.i = 0

        def next_batch(self):
            self.i += 1
            return self.batches[self.i % 4]

    data, loss = OnDevice(), build_loss(config.loss, acc_G.autocast)
    tally, window = StepTally(device), StatsWindow()
    set_seed(0)
    for step in range(1, 9):
        if step == 3:  # the first steps allocate and initialise (Adam state, cuDNN plans)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            stats, applied = train_step(nets, loss, data, config, measure=False)
            window.add(stats, applied)
            tally.record(step, applied, stats)
        finally:
            if step == 8:
                torch.cuda.set_sync_debug_mode(0)
    assert tally.read(8, acc_G.gather).skipped == 0
