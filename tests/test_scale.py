"""Scale-out and faults, as on a cluster: DeepSpeed for both nets, two "machines", kill -9, elastic
resume, pre-emption signals, the divergence guard. All real processes on CPU (gloo)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from dist_gan.run.checkpoint import list_checkpoints

from conftest import FAST, REPO, read_metrics, run_cli, start_cli, wait_for
from helpers import ACCELERATE, CPU_DDP, assert_same_weights, events, free_port, kill_and_resume, run_here, weights

pytestmark = pytest.mark.tier("cluster")  # every tier but unit is also slow (conftest)

PREEMPTED = 75


@pytest.fixture
def data():
    """Synthetic images in memory: these tests check mechanics, not learning (the shard stream's
    resume on real MNIST is covered by test_train_e2e and test_world_sizes)."""
    return ["--data.source=synthetic", "--data.format=memory"]


def train_args(config: str, run_dir: Path, data: list[str], *extra: str) -> list[str]:
    return ["dist_gan.train", f"configs/{config}.yaml", f"--run.dir={run_dir}", *data, *FAST, *extra]


# --- DeepSpeed ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_trains_both_nets_with_the_gradient_penalty(tmp_path, data, stage):
    """G and D each under its own ZeRO engine, 2 CPU ranks (DeepSpeed's CPU accelerator on gloo);
    stage 2 with Freeze-D too (D's first block frozen, out of its engine's optimizer)."""
    run = tmp_path / f"zero{stage}"
    launcher = [*ACCELERATE, "--config_file", str(REPO / "launch" / f"deepspeed_zero{stage}.yaml"),
                "--num_processes", "2"]
    env = {"DS_ACCELERATOR": "cpu"}
    # stage 2 also accumulates 2 micro-batches per update (DeepSpeed's gradient_accumulation_steps)
    common = ["--train.mixed_precision=no", "--run.ckpt_every=4", f"--optim.accumulate={stage}",
              f"--model.discriminator.freeze={stage - 1}"]
    run_cli(train_args("mnist_wgangp", run, data, *common, "--train.max_steps=4"), launcher, env=env)
    start = events(run, "start")[0]
    assert start["distributed_type"] == "DistributedType.DEEPSPEED" and start["world_size"] == 2
    assert start["effective_batch"] == 2 * 32 * stage
    ckpt = run / "checkpoints" / "step_00000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for net in ("G", "D"):  # one optimizer partition per rank, the weights once
        for rank in (0, 1):
            assert f"{net}/pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in manifest["files"]
        assert f"{net}/pytorch_model/mp_rank_00_model_states.pt" in manifest["files"]
    assert events(run, "checkpoint")[0]["replicas_identical"] == {"G": True, "D": True}
    gp = [r["gp"] for r in read_metrics(run) if "gp" in r]
    assert gp and all(v > 0 for v in gp)  # the double backward ran
    if stage == 1:
        return
    # resume under the same launch; and a clear refusal on another world size
    run_cli(train_args("mnist_wgangp", run, data, *common, "--train.max_steps=8",
                       "--train.resume=auto"), launcher, env=env)
    assert events(run, "start")[1]["resumed_from"].endswith("step_00000004")
    assert events(run, "end")[-1]["step"] == 8
    proc = run_cli(train_args("mnist_wgangp", run, data, *common, "--train.max_steps=12",
                              "--train.resume=auto"),
                   [*ACCELERATE, "--config_file", str(REPO / "launch" / "deepspeed_zero2.yaml"),
                    "--num_processes", "1"], env=env, check=False)
    assert proc.returncode != 0
    assert "written by 2 DeepSpeed processes and this run has 1" in proc.stdout + proc.stderr


def test_deepspeed_bf16_weights_with_batchnorm_spectral_norm_and_the_penalty(tmp_path, data, capsys):
    """DeepSpeed's bf16 casts the weights themselves (not autocast): the networks take fp32 in and
    give fp32 out, their buffers (BatchNorm statistics, spectral-norm vectors) follow the weights,
    the EMA stays fp32, and the run checkpoints, resumes and samples. (fp16 under DeepSpeed needs a
    GPU: DeepSpeed's CPU accelerator refuses it; bench/gpu_check.sh runs it.)"""
    launcher = [*ACCELERATE, "--config_file", str(REPO / "launch" / "deepspeed_zero2.yaml"),
                "--num_processes", "2"]
    env = {"DS_ACCELERATOR": "cpu"}
    run = tmp_path / "wgangp"  # BatchNorm in G, the gradient penalty's double backward through D
    common = ["--train.mixed_precision=bf16", "--run.ckpt_every=3"]
    run_cli(train_args("mnist_wgangp", run, data, *common, "--train.max_steps=3"), launcher, env=env)
    run_cli(train_args("mnist_wgangp", run, data, *common, "--train.max_steps=6", "--train.resume=auto"),
            launcher, env=env)
    starts = events(run, "start")
    assert [s["mixed_precision"] for s in starts] == ["bf16", "bf16"]
    assert starts[1]["resumed_from"].endswith("step_00000003") and events(run, "end")[-1]["step"] == 6
    logged = [r for r in read_metrics(run) if "loss_D" in r]
    assert logged and all(math.isfinite(r["loss_D"]) and r["gp"] > 0 for r in logged)
    ckpt = run / "checkpoints" / "step_00000006"
    weights = torch.load(ckpt / "D" / "pytorch_model" / "mp_rank_00_model_states.pt", map_location="cpu",
                         weights_only=False)["module"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    ema = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)["ema"]
    assert {v.dtype for v in ema.values() if v.is_floating_point()} == {torch.float32}
    run_here(["dist_gan.sample", str(run), "--n=4", f"--out={tmp_path / 'grid.png'}"], capsys)

    cgan = tmp_path / "cgan"  # spectral norm and the class projection in D, hinge loss
    run_cli(train_args("mnist_cgan", cgan, data, *common, "--train.max_steps=3"), launcher, env=env)
    assert events(cgan, "checkpoint")[-1]["replicas_identical"] == {"G": True, "D": True}


# --- two machines on one host ---------------------------------------------------------------------

@pytest.mark.tier("multiprocess")
def test_two_machines_train_log_once_and_checkpoint(tmp_path, data):
    run, port = tmp_path / "multinode", free_port()
    procs = []
    for machine in (0, 1):
        launcher = [*CPU_DDP, "--num_machines", "2", "--num_processes", "2", "--machine_rank",
                    str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        procs.append(start_cli(train_args("mnist_wgangp", run, data, "--train.max_steps=6",
                                          "--run.ckpt_every=3"),
                               launcher, log=tmp_path / f"machine{machine}.log"))
    for machine, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"machine{machine}.log").read_text()[-4000:]
    start = events(run, "start")
    assert len(start) == 1, "only global rank 0 logs"
    assert start[0]["world_size"] == 2 and start[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert [c["step"] for c in events(run, "checkpoint")] == [3, 6]
    assert all(c["replicas_identical"] == {"G": True, "D": True} for c in events(run, "checkpoint"))
    ckpt = run / "checkpoints" / "step_00000006"
    assert (ckpt / "G" / "random_states_1.pkl").is_file()  # the second machine's rank wrote its part


# --- kill -9 ----------------------------------------------------------------------------------------

def test_kill9_after_a_checkpoint_then_resume_is_bit_exact(tmp_path, data):
    """60 steps straight == 60 steps killed (SIGKILL) at a random moment after step 30, resumed."""
    common = ["--run.ckpt_every=30", "--train.max_steps=60"]
    run_cli(train_args("mnist_dcgan", tmp_path / "straight", data, *common))
    killed = tmp_path / "killed"
    kill_points = random.Random(int(os.environ.get("DIST_GAN_TEST_SEED", "0")))  # seeded: a failure repeats
    target = kill_points.choice([35, 40, 45])  # a point between the step-30 checkpoint and the end

    def kill_inside_a_step(proc):
        time.sleep(kill_points.uniform(0.0, 0.05))  # a seeded offset into the step, not a wait for something
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL

    kill_and_resume(train_args("mnist_dcgan", killed, data, *common), killed, launch=None, kill_after=target,
                    resumes_from=30, end=60, kill=kill_inside_a_step, timeout=300)
    assert_same_weights(tmp_path / "straight" / "checkpoints" / "step_00000060",
                        killed / "checkpoints" / "step_00000060")


def test_kill9_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, data):
    """SIGKILL while a checkpoint folder is being written: it is never loaded, the one before is."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    for attempt in range(5):  # a save takes milliseconds: catch one in the act
        proc = start_cli(train_args("mnist_dcgan", run, data, "--run.ckpt_every=1", "--run.keep_last=2",
                                    "--train.max_steps=100000", "--train.resume=auto"),
                         log=tmp_path / f"attempt{attempt}.log")
        wait_for(lambda: bool(list_checkpoints(run)), 300, "a first renamed, complete checkpoint", proc)
        wait_for(lambda: any(root.glob("step_*.tmp")), 300, "a checkpoint being written", proc,
                 interval=0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        staging = sorted(root.glob("step_*.tmp"))
        if staging:
            break
    assert staging, "never caught a save in progress"
    complete = list_checkpoints(run)  # a staging folder killed after its manifest still does not count
    assert complete and all(p.suffix != ".tmp" for p in complete)
    newest = complete[-1]
    steps_before = int(newest.name.split("_")[1])
    run_cli(train_args("mnist_dcgan", run, data, "--run.ckpt_every=1", "--run.keep_last=2",
                       f"--train.max_steps={steps_before + 2}", "--train.resume=auto"))
    assert events(run, "start")[-1]["resumed_from"] == str(newest)
    assert not list(root.glob("step_*.tmp")), "the interrupted save was cleaned up"
    # a checkpoint whose files disagree with its manifest is refused by name
    damaged = sorted(root.glob("step_*"))[-1]
    (damaged / "G" / "optimizer.bin").write_bytes(b"truncated")
    proc = run_cli(train_args("mnist_dcgan", run, data, "--train.resume=" + str(damaged),
                              f"--train.max_steps={steps_before + 9}"), check=False)
    assert proc.returncode != 0 and "is damaged" in proc.stderr and "G/optimizer.bin" in proc.stderr


# --- elastic resume ---------------------------------------------------------------------------------

def _params(state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of trained parameters (not BatchNorm statistics, which a step moves much further)."""
    return [k for k in state if state[k].is_floating_point() and "running" not in k]


def _first_step_was_a_resumed_adam_step(before: Path, after: Path, lr: float) -> float:
    """Fraction of G's weights whose change is exactly lr, what Adam's first step from empty
    moments does (m/sqrt(v) = +-1); a restored optimizer makes it small."""
    a, b = weights(before, "G"), weights(after, "G")
    deltas = torch.cat([(b[k] - a[k]).abs().flatten() for k in _params(a)])
    return float(((deltas - lr).abs() < 0.01 * lr).float().mean())


@pytest.mark.tier("multiprocess")
@pytest.mark.parametrize("worlds", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_elastic_resume_restores_weights_optimizer_ema_and_step(tmp_path, data, worlds):
    first, second = worlds
    run = tmp_path / "elastic"
    launch = {1: None, 2: CPU_DDP}
    common = ["--run.ckpt_every=1", "--run.keep_last=5", "--train.ema_decay=0.9"]
    run_cli(train_args("mnist_dcgan", run, data, *common, "--train.max_steps=4"), launch[first])
    proc = run_cli(train_args("mnist_dcgan", run, data, *common, "--train.max_steps=5",
                              "--train.resume=auto"), launch[second])
    assert "written by %d process(es), this run has %d" % (first, second) in proc.stderr
    start = events(run, "start")[-1]
    assert start["world_size"] == second and start["resumed_from"].endswith("step_00000004")
    root = run / "checkpoints"
    before, after = root / "step_00000004", root / "step_00000005"
    assert torch.load(after / "trainer_state.pt", weights_only=True)["world_size"] == second
    lr = 2e-4  # mnist_dcgan's
    # one step moved the weights by about lr: they were loaded, not re-initialised ...
    a, b = weights(before, "G"), weights(after, "G")
    assert max((b[k] - a[k]).abs().max().item() for k in _params(a)) < 20 * lr
    # ... and Adam's moments came with them (a fresh Adam moves almost every weight by exactly lr)
    assert _first_step_was_a_resumed_adam_step(before, after, lr) < 0.5
    ema_before = torch.load(before / "trainer_state.pt", weights_only=True)["ema"]
    ema_after = torch.load(after / "trainer_state.pt", weights_only=True)["ema"]
    # EMA continued from its saved value (a fresh EMA would equal G after one step)
    key = next(k for k in ema_after if "weight" in k)
    assert not torch.equal(ema_after[key], b[key])
    assert (ema_after[key] - ema_before[key]).abs().max() < (b[key] - ema_before[key]).abs().max()


# --- pre-emption --------------------------------------------------------------------------------------

@pytest.mark.tier("e2e")
def test_sigusr1_checkpoints_exits_75_and_resumes(tmp_path, data):
    run = tmp_path / "run"
    args = train_args("mnist_dcgan", run, data, "--train.max_steps=100000", "--run.ckpt_every=100000")
    proc = start_cli(args, log=tmp_path / "run.log")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3, 300,
             "a few log lines", proc)
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: any((run / "checkpoints").glob("step_*")), 120, "the checkpoint to start", proc,
             interval=0.001)
    proc.send_signal(signal.SIGUSR1)  # a second signal during the save changes nothing
    assert proc.wait(timeout=120) == PREEMPTED, (tmp_path / "run.log").read_text()[-3000:]
    stop = events(run, "preempted")[0]
    assert stop["stopped_by"] == "SIGUSR1"
    ckpt = run / "checkpoints" / f"step_{stop['step']:08d}"
    assert (ckpt / "manifest.json").is_file()
    resumed = run_cli(train_args("mnist_dcgan", run, data, f"--train.max_steps={stop['step'] + 5}",
                                 "--train.resume=auto"))
    assert resumed.returncode == 0
    assert events(run, "start")[-1]["resumed_from"] == str(ckpt)
    assert events(run, "end")[-1]["step"] == stop["step"] + 5


@pytest.mark.tier("multiprocess")
def test_sigterm_to_accelerate_launch_checkpoints_every_rank(tmp_path, data):
    """The launcher forwards SIGTERM to both ranks; they agree on a step and save it together."""
    run = tmp_path / "ddp"
    proc = start_cli(train_args("mnist_dcgan", run, data, "--train.max_steps=100000",
                                "--run.ckpt_every=100000"), CPU_DDP, log=tmp_path / "ddp.log")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3, 300,
             "a few log lines", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stop = events(run, "preempted")
    assert len(stop) == 1 and stop[0]["stopped_by"] == "SIGTERM" and stop[0]["world_size"] == 2
    ckpt = run / "checkpoints" / f"step_{stop[0]['step']:08d}"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"G/random_states_0.pkl", "G/random_states_1.pkl"} <= set(manifest["files"])


# --- divergence guard ---------------------------------------------------------------------------------

@pytest.mark.tier("e2e")
def test_divergence_guard_skips_then_stops_naming_step_and_loss(tmp_path, data):
    run = tmp_path / "nan"
    proc = run_cli(train_args("mnist_dcgan", run, data, "--train.max_steps=50", "--optim.d_lr=1e30",
                              "--train.max_bad_steps=3"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # the guard counts on the device and decides at the next log step (every 5): 3 or more in a row
    in_row = re.search(r"(\d+) steps in a row with a non-finite loss or gradient", proc.stderr)
    assert in_row and 3 <= int(in_row.group(1)) <= 5
    assert "update skipped" in proc.stderr
    diverged = events(run, "diverged")[0]
    assert "loss_D" in diverged["message"] and f"at step {diverged['step']}" in diverged["message"]


@pytest.mark.tier("e2e")
def test_divergence_guard_rolls_back_with_a_lower_learning_rate(tmp_path, data):
    run = tmp_path / "rollback"
    run_cli(train_args("mnist_dcgan", run, data, "--train.max_steps=10", "--run.ckpt_every=10"))
    # resume with an absurd D learning rate: it diverges, rolls back to step 10 at lr x 1e-34
    run_cli(train_args("mnist_dcgan", run, data, "--train.max_steps=20", "--run.ckpt_every=10",
                       "--train.resume=auto", "--optim.d_lr=1e30", "--train.max_bad_steps=2",
                       "--train.on_divergence=rollback", "--train.rollback_lr_scale=1e-34"))
    rollback = events(run, "rollback")
    assert len(rollback) == 1 and rollback[0]["to"].endswith("step_00000010")
    assert rollback[0]["step"] == 10 and rollback[0]["lr_scale"] == pytest.approx(1e-34)
    logged = [r for r in read_metrics(run) if "loss_D" in r and r["step"] > 10]
    assert logged[-1]["step"] == 20 and logged[-1]["rollbacks"] == 1
    assert logged[-1]["lr_D"] == pytest.approx(1e-4)
    assert all(r["loss_D"] is not None for r in logged)
    assert events(run, "end")[-1]["step"] == 20
    # train.max_rollbacks is the run's budget, not the process's: a restart finds it spent (the
    # checkpoint carries the guard's counters); 1e64 x the saved scale 1e-34 still diverges
    proc = run_cli(train_args("mnist_dcgan", run, data, "--train.max_steps=30", "--run.ckpt_every=10",
                              "--train.resume=auto", "--optim.d_lr=1e64", "--train.max_bad_steps=2",
                              "--train.on_divergence=rollback", "--train.max_rollbacks=1"), check=False)
    assert proc.returncode == 1 and "1 rollbacks (train.max_rollbacks) spent" in proc.stderr, proc.stderr[-2000:]
    assert len(events(run, "rollback")) == 1
    resumed = [r for r in read_metrics(run) if "skipped_steps" in r and r["step"] > 20]
    assert all(r["skipped_steps"] >= logged[-1]["skipped_steps"] for r in resumed)
