"""Gradient accumulation: accumulate=2 micro-batches of 32 give the gradients of one batch of 64,
in one process and in two (DDP, no_sync on the first micro-batch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from helpers import free_port

pytestmark = pytest.mark.tier("multiprocess")

PROBE = r'''
import os, sys
import torch
from accelerate.utils import set_seed
from dist_gan.run import backend
from dist_gan.config import load_config
from dist_gan.data import InMemoryBatches
from dist_gan.losses import build_loss
from dist_gan.run.nets import build_nets
from dist_gan.run.step import train_step

def gradients(batch, accumulate, acc_G, acc_D):
    config = load_config("configs/mnist_dcgan.yaml", {
        "data.batch_size": batch, "optim.accumulate": accumulate, "optim.n_critic": 1,
        "model.generator.norm": "none", "model.discriminator.norm": "none",
        "model.generator.width": 8, "model.discriminator.width": 8, "loss.name": "hinge"})
    nets = build_nets(config, acc_G, acc_D)
    images = torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    data = InMemoryBatches(images, torch.zeros(512, dtype=torch.long), batch_size=batch, seed=0,
                           rank=acc_G.process_index, world_size=acc_G.num_processes)
    set_seed(1234 + acc_G.process_index)  # the same noise stream in both runs
    train_step(nets, build_loss(config.loss, acc_G.autocast), data, config, measure=False)
    return {f"{name}.{key}": p.grad.detach().clone() for name, net in (("D", nets.D), ("G", nets.G))
            for key, p in net.plain.named_parameters()}

acc_G, acc_D = backend.make_accelerators(load_config("configs/mnist_dcgan.yaml", {}))
whole, split = gradients(64, 1, acc_G, acc_D), gradients(32, 2, acc_G, acc_D)
worst = max(float((whole[k] - split[k]).abs().max() / whole[k].abs().max().clamp_min(1e-12)) for k in whole)
# One file per rank: two processes printing to one pipe can interleave their lines.
with open(os.path.join(sys.argv[1], f"result{acc_G.process_index}.txt"), "w") as out:
    out.write(f"{acc_G.process_index} {acc_G.num_processes} {len(whole)} {worst}\n")
sys.stdout.flush()
os._exit(0)  # as `dist_gan.train` leaves a rank of a multi-process run (train._leave says why)
'''


@pytest.mark.parametrize("processes", [1, 2])
def test_two_micro_batches_of_32_give_the_gradients_of_one_batch_of_64(tmp_path, processes):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    cmd = [sys.executable, *(["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                               f"--master_port={free_port()}"]
                             if processes > 1 else []), str(probe), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [path.read_text().split() for path in sorted(tmp_path.glob("result*.txt"))]
    assert len(results) == processes
    for rank, world, tensors, worst in results:
        assert int(world) == processes and int(tensors) > 4
        assert float(worst) < 1e-4, f"rank {rank}: accumulated gradients differ by {worst} (relative)"
