"""Real multi-process runs: two CPU processes over gloo through `accelerate launch`."""

from __future__ import annotations

import pytest
import torch

from conftest import FAST, REPO, read_metrics, run_cli
from helpers import ACCELERATE as ACCELERATE_LAUNCH
from helpers import free_port

pytestmark = pytest.mark.tier("multiprocess")  # every tier but unit is also slow (conftest)

ACCELERATE = [*ACCELERATE_LAUNCH, "--config_file", str(REPO / "launch" / "cpu_ddp.yaml")]


def test_two_process_run_prepares_shards_and_keeps_replicas_identical(tmp_path, mnist_dir):
    """Also Freeze-D under DDP: D's first block (frozen) ends as it started, on both ranks."""
    run, shards = tmp_path / "ddp", tmp_path / "shards"
    proc = run_cli(["dist_gan.train", "configs/mnist_wgangp.yaml", "--train.max_steps=12",
                    f"--data.mnist_dir={mnist_dir}", f"--data.shards={shards}/train-{{000000..000005}}.tar",
                    f"--run.dir={run}", "--run.ckpt_every=6", *FAST, "--model.discriminator.freeze=1"],
                   launcher=ACCELERATE)
    # rank 0 wrote the missing shards while rank 1 waited, then both streamed their own halves
    assert proc.stderr.count("preparing them from mnist") == 1
    assert len(list(shards.glob("train-*.tar"))) == 6 and (shards / "manifest.json").is_file()
    records = read_metrics(run)
    start = [r for r in records if r.get("event") == "start"]
    assert len(start) == 1, "only rank 0 writes metrics"
    assert start[0]["world_size"] == 2 and start[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert all(r["world_size"] == 2 for r in records if "loss_D" in r)
    checks = [r for r in records if r.get("event") == "checkpoint"]
    assert [c["step"] for c in checks] == [6, 12]
    assert all(c["replicas_identical"] == {"G": True, "D": True} for c in checks)
    # both ranks wrote their RNG state into the checkpoint
    ckpt = run / "checkpoints" / "step_00000012"
    assert (ckpt / "G/random_states_0.pkl").is_file() and (ckpt / "G/random_states_1.pkl").is_file()
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from dist_gan.config import load_config
    from dist_gan.core.seeds import derive
    from dist_gan.models import build_discriminator, build_generator

    config = load_config(ckpt / "config.yaml")
    set_seed(derive(config.run.seed, "weights"))  # as build_nets draws the initial weights
    build_generator(config)
    initial, trained = build_discriminator(config), build_discriminator(config)
    trained.load_state_dict(load_file(ckpt / "D" / "model.safetensors"))
    first = zip(initial.blocks()[0].parameters(), trained.blocks()[0].parameters())
    assert all(torch.equal(a, b) for a, b in first)
    assert not all(torch.equal(a, b) for a, b in zip(initial.head.parameters(), trained.head.parameters()))


SCRIPT = """
import os, sys
import torch, torch.nn as nn
from accelerate import Accelerator
from dist_gan.run.ranks import check_replicas
acc = Accelerator(cpu=True)
torch.manual_seed(0)
net = nn.Linear(4, 3)
torch.manual_seed(0)  # 'other' below: the same on both ranks
same = check_replicas(acc, {"net": net})
if acc.process_index == 1:
    with torch.no_grad():
        net.weight[0, 0] += 1e-6
differ = check_replicas(acc, {"net": net})
with torch.no_grad():  # the same NaN on every rank: identical (finiteness is checked elsewhere)
    net.weight.copy_(torch.full_like(net.weight, 0.5))
    net.weight[1, 2] = float("nan")
both_nan = check_replicas(acc, {"net": net, "other": nn.Linear(2, 2)})
if acc.process_index == 1:
    with torch.no_grad():
        net.weight[1, 2] = 0.0
one_nan = check_replicas(acc, {"net": net})
if acc.is_main_process:
    print("RESULT", same["net"], differ["net"], both_nan["net"], one_nan["net"], acc.num_processes)
acc.wait_for_everyone()  # no rank may leave while another is still inside a collective
sys.stdout.flush()
os._exit(0)  # as `dist_gan.train` leaves a rank of a multi-process run (train._leave says why)
"""


def test_replica_check_detects_a_one_ulp_divergence(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    proc = run_cli(["torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(script)])
    assert "RESULT True False True False 2" in proc.stdout


DIVERGE = r"""
import sys
import torch
from dist_gan.run import loop
from dist_gan.config import load_config

checkpoint = loop.Run.checkpoint
def diverging_checkpoint(self, step):
    if step == 4 and self.rank == 1:  # one rank's D drifts by one ulp just before a checkpoint
        with torch.no_grad():
            weight = next(self.nets.D.plain.parameters())
            weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(1.0))
    return checkpoint(self, step)
loop.Run.checkpoint = diverging_checkpoint
loop.train(load_config(sys.argv[1], dict(arg[2:].split("=", 1) for arg in sys.argv[2:])))
"""


def test_ranks_that_disagree_leave_the_checkpoint_incomplete(tmp_path, mnist_dir):
    from dist_gan.run.checkpoint import list_checkpoints
    from dist_gan.run.retention import resolve_resume

    from conftest import read_metrics

    probe, run = tmp_path / "diverge.py", tmp_path / "run"
    probe.write_text(DIVERGE)
    proc = run_cli(["torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(probe),
                    "configs/mnist_dcgan.yaml",
                    f"--run.dir={run}", f"--data.mnist_dir={mnist_dir}", "--data.format=memory", *FAST,
                    "--train.max_steps=6", "--run.ckpt_every=2"], check=False)
    assert proc.returncode != 0 and "ranks disagree on the weights of D at step 4" in proc.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert not (run / "checkpoints" / "step_00000004").exists()
    assert resolve_resume("auto", run).name == "step_00000002"
    [event] = [r for r in read_metrics(run) if r.get("event") == "replicas_differ"]
    assert event["replicas_identical"] == {"G": True, "D": False}
