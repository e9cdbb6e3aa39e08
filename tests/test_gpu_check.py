"""bench/gpu_check.sh stays runnable: its CPU smoke mode runs every step at tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.tier("e2e")  # every tier but unit is also slow (conftest)


def test_gpu_check_script_runs_every_step_on_cpu(tmp_path):
    env = dict(os.environ, GPU_CHECK_CPU_SMOKE="1", PYTHON=sys.executable, OUT=str(tmp_path),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = (tmp_path / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table comes last
    assert "| mnist_wgangp | 8 | bf16 |" in summary  # smoke mode runs the step matrix on one config
    assert "| mnist_wgangp | 8 | no | DDP 1 (DistributedType.MULTI_CPU) |" in summary
    assert "DistributedType.DEEPSPEED | bf16 |" in summary and "finished, checkpointed" in summary
    assert "| channels_last |" in summary
    for recipe in ("cifar10_resnet", "folder256_stylegan2"):
        assert f"| {recipe} | bf16 |" in summary and "real img/s" in summary and "MFU" in summary
