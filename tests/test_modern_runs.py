"""The ResNet, StyleGAN2 and R3GAN recipes as users launch them (issues 16, 26): 2-process DDP with lazy
R1, R2, path length and schedules on, killed and resumed bit-exact; DeepSpeed ZeRO-2 in bf16 (with
ADA); keep_best."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from dist_gan.run.checkpoint import list_checkpoints
from dist_gan.run.retention import best_checkpoint, keep_as_best, restore_best

from conftest import REPO, read_metrics, run_cli
from helpers import ACCELERATE, CPU_DDP, TINY_SYNTHETIC, assert_same_weights, events, kill_and_resume, run_here

pytestmark = pytest.mark.tier("cluster")  # every tier but unit is also slow (conftest)


# 32 px synthetic RGB images in memory, narrow nets: the recipes' code paths in seconds
SMALL = [*TINY_SYNTHETIC, "--data.resolution=32", "--data.channels=3", "--model.z_dim=32", "--eval.every=0",
         "--run.keep_best=false"]
LAZY = ["--loss.r1_gamma=1.0", "--loss.r1_every=2"]
RECIPES = {
    "resnet": ["configs/cifar10_resnet.yaml", "--optim.n_critic=2", *LAZY],
    "stylegan2": ["configs/folder256_stylegan2.yaml", "--data.folder=null", "--loss.pl_every=2",
                  "--model.generator.mapping_layers=2", *LAZY],
    # rpgan with R1 and R2 (lazy, on different intervals), class-conditional r3gan nets, every
    # schedule ramping within the run (0.1 kimg: 8 steps x 8 images x 2 ranks = 0.128)
    "r3gan": ["configs/cifar10_r3gan.yaml", "--optim.accumulate=1", "--train.mixed_precision=no",
              *[f"--model.{net}.{key}={value}" for net in ("generator", "discriminator")
                for key, value in (("widths", "[16,16,16,16]"), ("blocks", "[1,1,1,1]"))],
              "--loss.r1_every=2", "--loss.r2_every=3",
              *[f"--schedule.{name}.kimg=0.1" for name in ("r1_gamma", "r2_gamma", "g_lr", "d_lr", "beta2",
                                                          "ema_kimg", "augment_p")]],
}


def args(arch: str, run: Path, *extra: str) -> list[str]:
    config, *recipe = RECIPES[arch]
    return ["dist_gan.train", config, f"--run.dir={run}", *SMALL, *recipe, *extra]


@pytest.mark.parametrize("arch", ["resnet", "stylegan2", "r3gan"])
def test_two_process_ddp_killed_and_resumed_bit_exact_with_lazy_r1_and_path_length(tmp_path, arch):
    """8 steps straight == killed (SIGKILL to every process) after the step-4 checkpoint, resumed;
    replicas identical at every checkpoint; the lazy terms ran (and the path-length mean moved)."""
    common = ["--train.max_steps=8", "--run.ckpt_every=4"]
    launch = [*CPU_DDP, "--num_processes", "2"]
    straight = tmp_path / "straight"
    run_cli(args(arch, straight, *common), launch)
    logged = [r for r in read_metrics(straight) if "loss_D" in r]
    assert any("r1" in r for r in logged)
    if arch == "stylegan2":
        pl = [r["pl_mean"] for r in logged if "pl_mean" in r]
        assert len(pl) >= 2 and pl[-1] != pl[0] and all(v > 0 for v in pl)
    checks = [e["replicas_identical"] for e in events(straight, "checkpoint")]
    if arch == "r3gan":  # both penalties ran; every ramp moved and agreed on both ranks at each save
        assert any("r2" in r for r in logged) and any("r1" in r and "r2" not in r for r in logged)
        gammas = [r["schedule/r1_gamma"] for r in logged]
        assert gammas == sorted(gammas, reverse=True) and gammas[0] > gammas[-1]
        assert [r["augment_p"] for r in logged] == sorted(r["augment_p"] for r in logged)
        assert all(len(c) == 10 and all(c.values()) for c in checks)  # G, D, augment_p, 7 ramps
    else:
        assert all(c == {"G": True, "D": True} for c in checks)

    killed = tmp_path / "killed"
    kill_and_resume(args(arch, killed, *common), killed, launch=launch, kill_after=5, resumes_from=4, end=8)
    assert_same_weights(straight / "checkpoints" / "step_00000008", killed / "checkpoints" / "step_00000008")
    a, b = (torch.load(run / "checkpoints" / "step_00000008" / "trainer_state.pt", weights_only=True)["loss"]
            for run in (straight, killed))
    assert a["updates"] == b["updates"] and ("pl" in a["terms"]) == (arch == "stylegan2")
    assert all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b)))


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree) for t in _tensors(tree[key])]
    return []


@pytest.mark.parametrize("arch", ["resnet", "stylegan2", "r3gan"])
def test_deepspeed_zero2_bf16(tmp_path, arch):
    """Both recipes under DeepSpeed ZeRO-2 with bf16 weights on 2 ranks: the double backward of R1
    (and of path length) through the plain networks, replicas identical, finite losses."""
    run = tmp_path / arch
    launcher = [*ACCELERATE, "--config_file", str(REPO / "launch" / "deepspeed_zero2.yaml"),
                "--num_processes", "2"]
    # with ADA at a fixed p: R1's double backward runs through the resampling of bf16 D's inputs too
    run_cli(args(arch, run, "--train.max_steps=4", "--run.ckpt_every=4", "--train.mixed_precision=bf16",
                 "--loss.r1_every=1", *(["--loss.pl_every=1"] if arch == "stylegan2" else []),
                 "--augment.kind=ada", "--augment.p=0.5", "--augment.target=null",
                 *(["--schedule.augment_p=null", "--loss.r2_every=1"] if arch == "r3gan" else [])),
            launcher, env={"DS_ACCELERATOR": "cpu"})
    start = events(run, "start")[0]
    assert start["distributed_type"] == "DistributedType.DEEPSPEED" and start["mixed_precision"] == "bf16"
    agreed = events(run, "checkpoint")[-1]["replicas_identical"]
    assert {k: v for k, v in agreed.items() if not k.startswith("schedule/")} == {"G": True, "D": True,
                                                                                 "augment_p": True}
    assert all(agreed.values())
    logged = [r for r in read_metrics(run) if "loss_D" in r]
    assert logged and all(r["r1"] > 0 and r["augment_p"] == 0.5 for r in logged)
    if arch == "stylegan2":
        assert all(r["pl"] > 0 and r["pl_mean"] > 0 for r in logged)  # a mean of squares: 0 only if broken
    if arch == "r3gan":
        assert all(r["r2"] > 0 and math.isfinite(r["loss_D"]) for r in logged)


@pytest.mark.tier("e2e")
def test_keep_best_survives_pruning_and_is_the_lowest_fid(tmp_path, capsys):
    """Evaluations every 2 steps; checkpoints/best holds the step of the lowest logged FID, pruning
    (keep_last 1) leaves it alone, and resume=auto still takes the newest checkpoint."""
    run = tmp_path / "run"
    common = ["dist_gan.train", "configs/mnist_dcgan.yaml", f"--run.dir={run}", "--data.source=synthetic",
              "--data.format=memory", "--data.batch_size=16", "--model.generator.width=8",
              "--model.discriminator.width=8", "--run.keep_best=true", "--eval.every=2",
              "--eval.n_samples=64", "--eval.feature_net=helpers:tiny_feature_net",
              "--run.keep_last=1", "--run.ckpt_every=100", "--run.log_every=2"]
    env = {"PYTHONPATH": str(REPO / "tests")}
    run_cli([*common, "--train.max_steps=12"], env=env)
    fids = {r["step"]: r["fid"] for r in read_metrics(run) if "fid" in r}
    assert sorted(fids) == [2, 4, 6, 8, 10, 12]
    bests = events(run, "best")
    assert bests and bests[-1]["fid"] == min(fids.values())
    best_step = min(fids, key=fids.get)
    best = best_checkpoint(run)
    manifest = json.loads((best / "manifest.json").read_text())
    assert manifest["step"] == best_step and bests[-1]["step"] == best_step
    state = torch.load(best / "trainer_state.pt", weights_only=True)
    assert state["best"] == {"fid": fids[best_step], "step": best_step}
    assert [p.name for p in list_checkpoints(run)] == ["step_00000012"]  # pruned to 1; best kept apart
    run_cli([*common, "--train.max_steps=14", "--train.resume=auto"], env=env)
    assert events(run, "start")[-1]["resumed_from"].endswith("step_00000012")
    # the resumed run knows the best so far: a new best must beat it
    later = [e for e in events(run, "best") if e["step"] > 12]
    assert all(e["fid"] < fids[best_step] for e in later)
    run_here(["dist_gan.sample", str(best), "--n=4", f"--out={tmp_path / 'best.png'}"], capsys)


@pytest.mark.tier("unit")
def test_keep_as_best_is_atomic_and_a_killed_swap_is_repaired(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        folder = run / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"step": step}))
    keep_as_best(run / "checkpoints" / "step_00000001")
    assert json.loads((best_checkpoint(run) / "manifest.json").read_text())["step"] == 1
    # a kill between renaming the old best aside and moving the new one in
    os.replace(best_checkpoint(run), run / "checkpoints" / "best.old")
    (run / "checkpoints" / "best.tmp").mkdir()
    restore_best(run)
    assert json.loads((best_checkpoint(run) / "manifest.json").read_text())["step"] == 1
    assert not (run / "checkpoints" / "best.old").exists() and not (run / "checkpoints" / "best.tmp").exists()
    keep_as_best(run / "checkpoints" / "step_00000002")
    assert json.loads((best_checkpoint(run) / "manifest.json").read_text())["step"] == 2
    # hard links: the best costs no disk, and deleting the original leaves it whole
    import shutil
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    assert json.loads((best_checkpoint(run) / "manifest.json").read_text())["step"] == 2
