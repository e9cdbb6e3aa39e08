"""No host sync and no collective of our own inside the step, between log and checkpoint steps.

A real 2-process run (DDP over gloo) with counters patched into the ways code waits for a device
(``Tensor.item``, ``__bool__``, ``tolist``, ``.cpu()``, ``float()``, ``int()``) when called from
dist_gan's own code, and into every torch.distributed collective whoever calls it (DDP's gradient
all-reduce runs in C++ and is not counted). Calls are charged to the step in progress; the steps
that log, checkpoint or sample may sync, every other step must show none. On a GPU,
tests/test_cuda.py runs steps under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import json

import pytest

from conftest import FAST, run_cli
from helpers import free_port

pytestmark = pytest.mark.tier("multiprocess")  # every tier but unit is also slow (conftest)


PROBE = r'''
import collections, json, sys
from pathlib import Path
import torch, torch.distributed as dist
from dist_gan.run import loop
from dist_gan.config import load_config

current, counts = {"step": 0}, collections.defaultdict(collections.Counter)
OURS = str(Path(loop.__file__).parent)

def counting(name, original, ours_only):
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if not ours_only or caller.startswith(OURS):
            counts[current["step"]][name] += 1
        return original(*args, **kwargs)
    return wrapper

for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
    setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name), True))
for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
             "broadcast_object_list", "reduce", "reduce_scatter", "gather", "scatter", "barrier"):
    setattr(dist, name, counting(name, getattr(dist, name), False))

step_fn = loop.train_step
def train_step(*args, **kwargs):
    current["step"] += 1
    return step_fn(*args, **kwargs)
loop.train_step = train_step

config = load_config(sys.argv[1], dict(arg[2:].split("=", 1) for arg in sys.argv[2:]))
loop.train(config)
import os
# One file per rank: two processes printing to one pipe can interleave their lines.
rank = os.environ.get("RANK", "0")
Path(config.run.dir, f"counts{rank}.json").write_text(
    json.dumps({"rank": rank, "counts": {step: dict(c) for step, c in counts.items()}}))
os._exit(0)  # as `dist_gan.train` leaves a rank of a multi-process run (train._leave says why)
'''


SYNTHETIC_32 = ["--data.source=synthetic", "--data.format=memory", "--data.resolution=32", "--data.channels=3",
                "--data.batch_size=8", "--model.z_dim=32", "--eval.every=0", "--run.keep_best=false"]
# Every config with a term that keeps state: path length's running mean (stylegan2), the ramps (r3gan)
RECIPES = {
    "mnist_wgangp": ["configs/mnist_wgangp.yaml", "--data.format=memory", *FAST],
    "stylegan2": ["configs/folder256_stylegan2.yaml", "--data.folder=null", *SYNTHETIC_32,
                  "--model.generator.width=4", "--model.discriminator.width=4", "--loss.pl_every=2",
                  "--loss.r1_every=2", "--model.generator.mapping_layers=2"],
    "r3gan": ["configs/mnist_r3gan.yaml", "--data.format=memory", "--data.batch_size=8",
              "--model.generator.widths=[16,16,16]", "--model.discriminator.widths=[16,16,16]",
              "--loss.r1_every=2", "--loss.r2_every=3"],
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_steps_between_log_and_checkpoint_steps_never_sync(tmp_path, mnist_dir, recipe):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    config, *settings = RECIPES[recipe]
    args = [f"--run.dir={tmp_path / 'run'}", f"--data.mnist_dir={mnist_dir}", *settings,
            "--run.log_every=4", "--run.ckpt_every=6", "--run.sample_every=100",
            "--train.max_steps=12", "--optim.n_critic=2", "--optim.accumulate=2"]
    proc = run_cli(["torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(probe),
                    config, *args])
    assert proc.returncode == 0
    reports = [json.loads(path.read_text()) for path in sorted((tmp_path / "run").glob("counts*.json"))]
    assert sorted(int(report["rank"]) for report in reports) == [0, 1]
    for report in reports:
        rank = report["rank"]
        counts = {int(step): calls for step, calls in report["counts"].items()}
        quiet = [s for s in range(1, 13) if s % 4 and s % 6 and s != 12]
        assert {s: counts[s] for s in quiet if counts.get(s)} == {}, f"rank {rank} synced in a step"
        for step in (4, 6, 12):  # the counters do see the log / checkpoint steps' reads
            assert sum(counts.get(step, {}).values()) > 0, (rank, step, counts)
