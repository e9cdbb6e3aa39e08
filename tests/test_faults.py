"""Faults that used to lose work (issue 13), and errors that must be one line.

Unit tests build tiny shards, fake checkpoints and lock files; the end-to-end ones run the real
entry points on real MNIST shards with loader workers, as users run them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dist_gan.config import ConfigError, load_config
from dist_gan.core.fsutil import crc32_of, sha256_of
from dist_gan.data import DataError, prepare_shards
from dist_gan.run import runlock
from dist_gan.run.checkpoint import MANIFEST_FORMAT, CheckpointError, list_checkpoints, read_manifest
from dist_gan.run.launcher import parse_launch
from dist_gan.run.retention import last_healthy, prune_checkpoints, resolve_resume

from conftest import FAST, REPO, read_metrics, run_cli, start_cli, wait_for
from helpers import ACCELERATE, events, labels_of, run_module_here, stream, tiny_shards

pytestmark = pytest.mark.tier("unit")

PREEMPTED = 75


def fake_checkpoint(run, step, healthy=True, payload=b"0123456789" * 10):
    folder = run / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.pt").write_bytes(payload)
    manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": 1,
                "distributed_type": "DistributedType.NO", "healthy": healthy,
                "files": {"trainer_state.pt": len(payload)},
                "crc32": {"trainer_state.pt": crc32_of(folder / "trainer_state.pt")}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def flip_byte(path: Path, offset: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


# --- checkpoints: checksums, health, pruning ---------------------------------------------------------

def test_a_same_size_corruption_is_caught_and_auto_resume_falls_back(tmp_path, caplog):
    """A same-size corruption fails its CRC-32; resume=auto takes the older checkpoint, saying why."""
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    flip_byte(newest / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=r"trainer_state.pt: CRC-32 [0-9a-f]{8}, manifest says"):
        read_manifest(newest)
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("auto", tmp_path).name == "step_00000010"
    assert "skipping checkpoint" in caplog.text and "step_00000020" in caplog.text
    with pytest.raises(CheckpointError):  # a checkpoint named explicitly is refused, not replaced
        from dist_gan.run.checkpoint import load_generator_state

        load_generator_state(newest)


def test_a_checkpoint_verified_moments_ago_is_not_read_twice_but_sizes_still_count(tmp_path):
    """read_manifest(checksums=False), for a load right after resolve_resume verified: sizes only."""
    folder = fake_checkpoint(tmp_path, 10)
    flip_byte(folder / "trainer_state.pt")
    read_manifest(folder, checksums=False)
    (folder / "trainer_state.pt").write_bytes(b"short")
    with pytest.raises(CheckpointError, match="trainer_state.pt: 5 bytes"):
        read_manifest(folder, checksums=False)


def test_auto_resume_with_nothing_to_resume_says_it_starts_fresh(tmp_path, caplog):
    """resume=auto with no checkpoint logs that it starts fresh."""
    with caplog.at_level(logging.INFO):
        assert resolve_resume("auto", tmp_path) is None
    assert "no complete checkpoint" in caplog.text and "starting fresh" in caplog.text


def test_rollback_target_is_the_newest_healthy_checkpoint_and_pruning_keeps_it(tmp_path):
    """Unhealthy checkpoints are never the rollback target; keep_last never prunes the newest healthy one."""
    fake_checkpoint(tmp_path, 10)
    good = fake_checkpoint(tmp_path, 20)
    for step in (30, 40, 50):
        fake_checkpoint(tmp_path, step, healthy=False)
    assert last_healthy(tmp_path) == good
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_00000010", "step_00000030"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000020", "step_00000040",
                                                             "step_00000050"]
    assert last_healthy(tmp_path) == good


# --- the run directory lock -------------------------------------------------------------------------

def write_lock(run: Path, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lock = run / runlock.LOCK_NAME
    lock.write_text(json.dumps(holder))
    return lock


@pytest.mark.tier("e2e")
def test_a_live_lock_is_refused_naming_the_holder(tmp_path):
    """A run directory locked by a live process is refused naming host and pid; a dead holder's lock is taken over."""
    import socket

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, host=socket.gethostname(), pid=other.pid, since="earlier")
        with pytest.raises(runlock.RunDirInUse, match=f"in use by pid {other.pid} on {socket.gethostname()}"):
            runlock.acquire(tmp_path)
    finally:
        other.kill()
        other.wait()
    lock = runlock.acquire(tmp_path)  # now its holder is gone: taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    runlock.release(lock)
    assert not lock.exists()


def test_a_lock_from_another_host_is_refused_unless_it_is_this_slurm_job(tmp_path, monkeypatch):
    """Another host's lock is refused, unless it is this (requeued) Slurm job's."""
    write_lock(tmp_path, host="node-that-is-not-here", pid=1234, slurm_job_id="77")
    with pytest.raises(runlock.RunDirInUse, match="node-that-is-not-here"):
        runlock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued onto this node
    runlock.release(runlock.acquire(tmp_path))


# --- prepare never destroys what is there -----------------------------------------------------------

def test_a_failed_prepare_leaves_the_existing_shards_whole(tmp_path):
    """A failed prepare (other resolution, unreadable image with --strict) leaves the shards and manifest untouched; without --strict bad images are skipped and counted."""
    pattern, _ = tiny_shards(tmp_path, n_shards=2, per_shard=12)
    before = {p.name: sha256_of(p) for p in tmp_path.glob("train-*.tar")}
    manifest = (tmp_path / "manifest.json").read_text()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.new("L", (8, 8), color=i * 40).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    from dist_gan.config import DataConfig

    # another resolution: refused before anything is read or deleted
    with pytest.raises(DataError, match="refusing to add 16px"):
        prepare_shards(DataConfig(source="folder", root=str(folder), resolution=16, channels=1),
                       tmp_path, progress=False)
    # an unreadable image under --strict: stops, and the old shards stay
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png.*--strict"):
        prepare_shards(DataConfig(source="folder", root=str(folder), resolution=8, channels=1,
                                  strict=True), tmp_path, progress=False)
    assert {p.name: sha256_of(p) for p in tmp_path.glob("train-*.tar")} == before
    assert (tmp_path / "manifest.json").read_text() == manifest
    assert not list(tmp_path.glob(".*prepare.tmp"))
    # without --strict the bad image is skipped and counted; the new shards replace the old
    written = prepare_shards(DataConfig(source="folder", root=str(folder), resolution=8, channels=1,
                                        shard_size=4), tmp_path, progress=False)
    split = written["splits"]["train"]
    assert split["total"] == 5 and split["skipped_unreadable"] == 1
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert [e["count"] for e in split["shards"]] == [4, 1]
    s = stream(str(tmp_path / "train-{000000..000001}.tar"), workers=0, batch_size=1, shuffle_buffer=0)
    assert len(labels_of(s, 5)) == 5


def test_a_manifest_count_that_disagrees_with_its_shard_is_named(tmp_path, caplog):
    """A manifest sample count that disagrees with its shard is named by the loader and by verify."""
    from dist_gan.data.shards import verify_shards

    pattern, _ = tiny_shards(tmp_path, n_shards=2, per_shard=12)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["count"] = 20
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):  # one past the 24 samples: both shards read to their end
        labels_of(stream(pattern, workers=0, batch_size=1, shuffle_buffer=0), 25)
    assert "train-000001.tar holds 12 samples but its manifest entry says 20" in caplog.text
    assert verify_shards(pattern) == [f"{tmp_path}/train-000001.tar: 12 samples, the manifest says 20"]
    with pytest.raises(DataError, match="holds 12 samples but its manifest entry says 20"):
        labels_of(stream(pattern, workers=0, batch_size=1, shuffle_buffer=0, strict=True), 25)


# --- one-line errors ----------------------------------------------------------------------------------

def test_strict_errors_from_loader_workers_are_one_line(tmp_path):
    """A strict-mode error raised in a loader worker is one line, without the worker's traceback."""
    from helpers import add_broken_samples

    pattern, _ = tiny_shards(tmp_path, n_shards=2, per_shard=12)
    add_broken_samples(tmp_path / "train-000000.tar")
    add_broken_samples(tmp_path / "train-000001.tar")
    with pytest.raises(DataError) as err:
        labels_of(stream(pattern, workers=2, batch_size=2, strict=True), 12)
    message = str(err.value)
    assert "sample '000000" in message and "(data.strict=true)" in message
    assert "Traceback" not in message and "\n" not in message


def test_config_values_people_write(tmp_path):
    """YAML 1e-4 / 2E-4 are numbers; an empty YAML file and a run.dir naming a file are one-line errors."""
    config = tmp_path / "lr.yaml"
    config.write_text("optim:\n  g_lr: 1e-4\n  d_lr: 2E-4\nloss:\n  gp_weight: 1.0e+1\n")
    loaded = load_config(config)
    assert (loaded.optim.g_lr, loaded.optim.d_lr, loaded.loss.gp_weight) == (1e-4, 2e-4, 10.0)
    config.write_text("optim:\n  g_lr: fast\n")
    with pytest.raises(ConfigError, match="optim.g_lr = 'fast' is not a number"):
        load_config(config)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(empty)
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="run.dir = .*not_a_dir.*names a file, not a directory"):
        load_config(None, {"run.dir": str(a_file)})


@pytest.mark.parametrize("args,message", [
    (["dist_gan.sample", "nowhere", "--n=0"], "--n=0 must be a whole number >= 1"),
    (["dist_gan.sample", "nowhere", "--n=-1"], "--n=-1 must be a whole number >= 1"),
    (["dist_gan"], "usage: dist-gan COMMAND"),
])
def test_bad_commands_fail_in_one_line(args, message, capsys):
    """sample --n=0 / --n=-1, dist-gan without a command: non-zero exit, one line (in this process)."""
    code, stderr = run_module_here(args, capsys)
    assert code != 0
    assert message in stderr and "Traceback" not in stderr, stderr[-2000:]


@pytest.mark.tier("e2e")
def test_an_impossible_resolution_fails_in_one_line(tmp_path):
    proc = run_cli(["dist_gan.train", "configs/mnist_dcgan.yaml", "--data.format=memory", "--data.resolution=30",
                    "--data.source=synthetic", f"--run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode != 0
    assert "data.resolution = 30 is not 2^k x (4..7)" in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr[-2000:]


# --- end to end ---------------------------------------------------------------------------------------

def train_args(run: Path, data: list[str], *extra: str) -> list[str]:
    return ["dist_gan.train", "configs/mnist_wgangp.yaml", f"--run.dir={run}", *data, *FAST,
            "--model.generator.width=8", "--model.discriminator.width=8", "--optim.n_critic=1", *extra]


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    os.killpg(os.getpgid(proc.pid), sig)


@pytest.mark.tier("e2e")
@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_and_exits_75(tmp_path, shard_data):
    """SIGTERM to the whole process group with 2 loader workers: checkpoint, exit 75, lock released.

    What a Slurm time limit or `kill -TERM -- -PGID` does: every process, loader workers too."""
    run = tmp_path / "run"
    proc = start_cli(train_args(run, shard_data, "--train.max_steps=100000", "--run.ckpt_every=100000"),
                     log=tmp_path / "run.log", new_session=True)
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3, 300,
             "a few log lines", proc)
    kill_group(proc, signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED, (tmp_path / "run.log").read_text()[-3000:]
    stop = events(run, "preempted")[0]
    assert stop["stopped_by"] == "SIGTERM"
    assert read_manifest(run / "checkpoints" / f"step_{stop['step']:08d}")["healthy"] is True
    assert not (run / runlock.LOCK_NAME).exists()


@pytest.mark.tier("e2e")
@pytest.mark.slow
def test_a_signal_during_start_up_still_exits_75(tmp_path, shard_data):
    """SIGTERM during start-up: one step, a checkpoint, exit 75."""
    run = tmp_path / "run"
    proc = start_cli(train_args(run, shard_data, "--train.max_steps=100000"), log=tmp_path / "run.log")
    # the lock is taken right after the process group forms, before the networks and data exist
    wait_for(lambda: (run / runlock.LOCK_NAME).exists(), 120, "the run lock", proc, interval=0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED, (tmp_path / "run.log").read_text()[-3000:]
    assert events(run, "preempted")[0]["step"] == 1  # one step, then the checkpoint
    assert list_checkpoints(run)[-1].name == "step_00000001"


@pytest.mark.tier("e2e")
@pytest.mark.slow
def test_a_second_run_in_the_same_directory_is_refused(tmp_path, shard_data):
    """A second run in a busy run directory exits 1 naming the first's pid and writes nothing there."""
    run = tmp_path / "run"
    first = start_cli(train_args(run, shard_data, "--train.max_steps=100000", "--run.ckpt_every=100000"),
                      log=tmp_path / "first.log")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 2, 300,
             "the first run to train", first)
    second = run_cli(train_args(run, shard_data, "--train.max_steps=10"), check=False)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"is in use by pid {first.pid}" in second.stderr, second.stderr[-2000:]
    first.send_signal(signal.SIGUSR1)
    assert first.wait(timeout=120) == PREEMPTED
    assert len(events(run, "start")) == 1  # the refused run wrote nothing into the directory


@pytest.mark.tier("e2e")
@pytest.mark.slow
def test_divergence_never_checkpoints_mid_streak_and_rolls_back_to_the_last_healthy(tmp_path, shard_data):
    """Divergence with rollback: no checkpoint mid-streak, every rollback to the last healthy one, which survives.

    The issue's reproduction: 6 good steps, then absurd learning rates with rollback."""
    run = tmp_path / "run"
    run_cli(train_args(run, shard_data, "--train.max_steps=6", "--run.ckpt_every=2"))
    proc = run_cli(train_args(run, shard_data, "--train.resume=auto", "--optim.g_lr=1e6",
                              "--optim.d_lr=1e6", "--train.on_divergence=rollback",
                              "--train.max_steps=40", "--run.ckpt_every=2"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "last good checkpoint: " + str(run / "checkpoints" / "step_00000006") in proc.stderr
    rollbacks = events(run, "rollback")
    assert len(rollbacks) == 3 and all(r["to"].endswith("step_00000006") for r in rollbacks)
    step6 = run / "checkpoints" / "step_00000006"
    assert read_manifest(step6)["healthy"] is True
    # whatever was written after step 6 is not a rollback target, and step 6 was never pruned
    later = [p for p in list_checkpoints(run) if p.name > step6.name]
    assert all(read_manifest(p)["healthy"] is False for p in later)
    assert last_healthy(run) == step6


@pytest.mark.tier("e2e")
@pytest.mark.slow
def test_a_corrupted_newest_checkpoint_is_skipped_on_resume(tmp_path, shard_data):
    """A corrupted newest checkpoint is skipped by resume=auto (named, with the checksum), the previous one resumes."""
    run = tmp_path / "run"
    run_cli(train_args(run, shard_data, "--train.max_steps=4", "--run.ckpt_every=2"))
    newest = run / "checkpoints" / "step_00000004"
    flip_byte(newest / "trainer_state.pt", offset=100)
    proc = run_cli(train_args(run, shard_data, "--train.resume=auto", "--train.max_steps=6"))
    assert "skipping checkpoint" in proc.stderr and "CRC-32" in proc.stderr
    assert events(run, "start")[-1]["resumed_from"].endswith("step_00000002")
    assert events(run, "end")[-1]["step"] == 6


@pytest.mark.tier("e2e")
@pytest.mark.slow
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, shard_data, small_tmpfs):
    """Disk full while checkpointing: one line naming the device, the previous checkpoint stays newest."""
    run = small_tmpfs / "run"
    run_cli(train_args(run, shard_data, "--train.max_steps=2", "--run.ckpt_every=2"))
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "step_00000002").rglob("*") if f.is_file())
    stat = os.statvfs(small_tmpfs)
    room = size // 2  # room for logs and samples, not for another checkpoint
    with open(small_tmpfs / "ballast", "wb") as f:
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - room))
    proc = run_cli(train_args(run, shard_data, "--train.resume=auto", "--train.max_steps=4",
                              "--run.ckpt_every=2", "--run.sample_every=1000"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no space left on {small_tmpfs} while writing checkpoint step_00000004" in proc.stderr
    assert "step_00000002 stays the newest complete checkpoint" in proc.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert not list((run / "checkpoints").glob("*.tmp"))
    read_manifest(run / "checkpoints" / "step_00000002")


@pytest.mark.tier("e2e")
@pytest.mark.parametrize("source,advice", [
    ("mnist", r"put the four IDX files \(train-images-idx3-ubyte.gz, .*\) in a directory and set "
              "--data.mnist_dir=DIR"),
    ("cifar10", "unpack cifar-10-python.tar.gz so that .*cifar-10-batches-py holds data_batch_1"),
])
def test_a_dataset_download_without_network_is_one_line(tmp_path, source, advice):
    """The first door of a new user: the default config on a machine that cannot reach the mirrors
    (here: every connection goes to a dead proxy) ends in one line naming the setting to use."""
    dead = "http://127.0.0.1:9"
    extra = ["--data.resolution=32", "--data.channels=3"] if source == "cifar10" else []
    proc = run_cli(["dist_gan.train", "configs/mnist_dcgan.yaml", f"--run.dir={tmp_path / 'run'}",
                    f"--data.source={source}", f"--data.root={tmp_path / 'downloads'}",
                    f"--data.shards={tmp_path / 'shards'}/train-{{000000..000005}}.tar", *extra],
                   check=False, env={"http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead,
                                     "HTTPS_PROXY": dead, "no_proxy": ""}, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(f"could not download {'MNIST' if source == 'mnist' else 'CIFAR-10'} .*; without "
                     f"network, {advice}", last), last


@pytest.mark.tier("cluster")
def test_a_deepspeed_launch_without_deepspeed_is_one_line(tmp_path):
    """A DeepSpeed profile on a machine without the [deepspeed] extra (here a package that fails to
    import shadows the installed one) names the pip install to run."""
    shadow = tmp_path / "shadow" / "deepspeed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named deepspeed')\n")
    proc = run_cli(["dist_gan.train", "configs/mnist_dcgan.yaml", f"--run.dir={tmp_path / 'run'}",
                    "--data.source=synthetic", "--data.format=memory", "--train.max_steps=1"],
                   check=False, env={"ACCELERATE_USE_DEEPSPEED": "true",
                                     "PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "uses DeepSpeed" in last and "pip install -e '.[deepspeed]'" in last, last


@pytest.mark.tier("cluster")
@pytest.mark.parametrize("profile,asks", [
    ("gpu_single", "gpu_ids: 0"), ("gpu_ddp", "distributed_type: MULTI_GPU"),
    ("deepspeed_zero1", "distributed_type: DEEPSPEED"), ("deepspeed_zero2", "distributed_type: DEEPSPEED"),
    ("multinode", "distributed_type: MULTI_GPU"), ("cpu_ddp", None), ("cpu_single", None)])
def test_each_shipped_launch_profile_is_read_as_gpu_or_cpu(profile, asks):
    """What the launcher check decides for every profile we ship, from the launcher's command line."""
    argv = ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--config_file", f"launch/{profile}.yaml",
            "--num_processes", "2", "-m", "dist_gan.train", "--config_file", "ignored.yaml"]
    request = parse_launch(argv, REPO, default_profile=None)
    assert request.profile == REPO / "launch" / f"{profile}.yaml"
    assert request.wants_gpu({}) == asks
    assert request.wants_gpu({"DS_ACCELERATOR": "cpu"}) == (None if "DEEPSPEED" in str(asks) else asks)
    assert parse_launch([*argv[:5], "--cpu", *argv[5:]], REPO, None).wants_gpu({}) is None
    # an option with a value before --config_file (the tests' launcher puts --main_process_port 0 there)
    ported = parse_launch([*argv[:3], "--main_process_port", "0", *argv[3:]], REPO, None)
    assert ported.profile == REPO / "launch" / f"{profile}.yaml" and ported.wants_gpu({}) == asks
    assert parse_launch([*argv[:3], "--cpu", "train.py"], REPO, None).flags == ("--cpu",)
    assert parse_launch(["python", "-m", "dist_gan.train"], REPO, None) is None


@pytest.mark.tier("multiprocess")
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
@pytest.mark.parametrize("profile,processes", [("gpu_single", 1), ("gpu_ddp", 2)])
def test_a_gpu_launch_profile_without_gpus_is_one_line(tmp_path, profile, processes):
    """A GPU profile on a GPU-less machine stops each process with one line naming the profile.

    (Accelerate alone trains every process on the CPU without a word.)"""
    launcher = [*ACCELERATE, "--config_file", f"launch/{profile}.yaml", "--num_processes", str(processes)]
    proc = run_cli(["dist_gan.train", "configs/mnist_dcgan.yaml", f"--run.dir={tmp_path / 'run'}",
                    "--data.source=synthetic", "--data.format=memory", "--train.max_steps=1"],
                   launcher=launcher, check=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("dist_gan.train: error:")]
    assert len(ours) == processes, proc.stderr[-3000:]
    assert f"launch/{profile}.yaml asks for GPUs" in ours[0], ours[0]
    assert "--config_file launch/cpu_ddp.yaml" in ours[0]
    assert "dist_gan/" not in proc.stderr  # no traceback through our code (the launcher adds its own)
    assert not (tmp_path / "run" / "checkpoints").exists()
