"""What several test modules share (no test module imports another): launchers, the run's events,
weights compared bit for bit, a process tree to kill, the kill-and-resume recipe, a tiny synthetic
run, a user's feature network, tiny shards to read back."""

from __future__ import annotations

import io
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_gan.config import DataConfig
from dist_gan.data import build_batch_stream
from dist_gan.data.shards import SHARD_MANIFEST, write_shards
from dist_gan.data.sources import TensorImageSet

from conftest import REPO, read_metrics, run_cli, start_cli, wait_for

# --main_process_port 0: Accelerate picks a free port, so launches on both pytest-xdist workers never
# meet on its fixed default (29500)
ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch", "--main_process_port", "0"]
CPU_DDP = [*ACCELERATE, "--config_file", str(REPO / "launch" / "cpu_ddp.yaml")]


def free_port() -> int:
    """A TCP port free now on localhost (for launchers that take an explicit one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("event") == kind]

def weights(checkpoint: Path, net: str) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / net / "model.safetensors")

def assert_same_weights(a: Path, b: Path) -> None:
    for net in ("G", "D"):
        wa, wb = weights(a, net), weights(b, net)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{net}:{key} differs between {a} and {b}"

def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (torch's launcher starts each rank in a session of its own,
    so killing the launcher's process group would leave the ranks running)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        found.append(queue.pop())
        queue += children.get(found[-1], [])
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to a launcher and every process below it (a kill -9 of the whole run), then reap it."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


# A run as small as a run gets, on synthetic data: for tests of mechanics (checkpoints, signals,
# locks, errors), not of learning. ``tiny_run(config, run_dir, *more)`` is its command line.
TINY_SYNTHETIC = ["--data.source=synthetic", "--data.format=memory", "--data.batch_size=8",
                  "--model.generator.width=4", "--model.discriminator.width=4", "--run.log_every=1",
                  "--run.sample_every=100"]


def tiny_run(config: str, run_dir: Path, *more: str) -> list[str]:
    """``python -m`` arguments of a tiny synthetic-data training run (``more`` overrides)."""
    return ["dist_gan.train", config, f"--run.dir={run_dir}", *TINY_SYNTHETIC, *more]


def logged_step(run_dir: Path) -> int:
    """The last step a run has logged its losses for (0 before its first log line)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return 0
    return max((r["step"] for r in read_metrics(run_dir) if "loss_D" in r), default=0)


def kill_and_resume(args: list[str], run_dir: Path, *, launch: list[str] | None, kill_after: int,
                    resumes_from: int, end: int, resume_args: list[str] | None = None, kill=None,
                    timeout: int = 600) -> None:
    """The kill -9 recipe: start ``args`` (under ``launch``), wait until step ``kill_after`` is logged,
    kill every process of the run (``kill(proc)``, default ``kill_tree``), check the run had not
    reached ``end``, resume it with ``train.resume=auto`` (``resume_args``: its command line, default
    ``args``) and check it resumed from step ``resumes_from``. The caller compares with a straight run."""
    proc = start_cli(args, launch, log=run_dir.parent / f"{run_dir.name}.killed.log")
    wait_for(lambda: logged_step(run_dir) >= kill_after, timeout, f"step {kill_after}", proc, interval=0.01)
    (kill or kill_tree)(proc)
    assert not (run_dir / "checkpoints" / f"step_{end:08d}").exists(), "the run ended before the kill"
    run_cli([*(resume_args or args), "--train.resume=auto"], launch, timeout=timeout)
    started = [r for r in read_metrics(run_dir) if r.get("event") == "start"]
    assert started[-1]["resumed_from"].endswith(f"step_{resumes_from:08d}"), started[-1]


class TinyFeatures(torch.nn.Module):
    """A user's own feature network, named in a config as helpers:tiny_feature_net."""

    def embed(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)
        return pooled, pooled[:, :3]


def tiny_feature_net(config):
    return TinyFeatures()


def tiny_shards(out, n_shards=8, per_shard=24, resolution=8, channels=1, encoding="png"):
    """Shards whose label is the sample's index, so every sample can be told apart."""
    n = n_shards * per_shard
    images = torch.randint(0, 256, (n, channels, resolution, resolution), dtype=torch.uint8)
    write_shards(TensorImageSet(images, torch.arange(n)), out, "train", per_shard, "test",
                 resolution, channels, progress=False, encoding=encoding)
    return str(out / f"train-{{000000..{n_shards - 1:06d}}}.tar"), images

def stream(pattern, rank=0, world=1, **overrides):
    settings = dict(shards=pattern, resolution=8, channels=1, batch_size=6, workers=2,
                    shuffle_buffer=10, prepare_if_missing=False)
    settings.update(overrides)
    return build_batch_stream(DataConfig(**settings), seed=7, rank=rank, world_size=world, device="cpu")

def labels_of(s, batches):
    return [int(v) for _ in range(batches) for v in s.next_batch()[1]]

def replace_sample(path, position, members):
    """Rewrite shard ``path`` with sample number ``position``'s members replaced by ``members``
    ([(extension, bytes)]), keeping its key: the shard holds as many samples as its manifest says."""
    with tarfile.open(path) as tar:
        entries = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({name.split(".", 1)[0] for name, _ in entries})
    key = keys[position]
    entries = [e for e in entries if e[0].split(".", 1)[0] != key]
    entries += [(f"{key}.{extension}", payload) for extension, payload in members]
    entries.sort(key=lambda e: e[0].split(".", 1)[0])
    with tarfile.open(path, "w") as tar:
        for name, payload in entries:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    manifest = json.loads((path.parent / SHARD_MANIFEST).read_text())  # only the sample is bad
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["name"] == path.name:
            entry["bytes"] = path.stat().st_size
    (path.parent / SHARD_MANIFEST).write_text(json.dumps(manifest))
    return key

def add_broken_samples(path):
    """Sample 3 gets a garbage png, sample 5 loses its image."""
    return (replace_sample(path, 3, [("png", b"not a png"), ("cls", b"1")]),
            replace_sample(path, 5, [("cls", b"2")]))


def run_module_here(args: list[str], capsys) -> tuple[int, str]:
    """``python -m MODULE ARGS`` in this process: its exit status and what it wrote to stderr, with
    the message ``sys.exit`` carried (the interpreter prints that on stderr)."""
    module, *argv = args
    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        with warnings.catch_warnings():  # runpy: "found in sys.modules", as an earlier case imported it
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code, message = 0, ""
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        message = stop.code if isinstance(stop.code, str) else ""
    finally:
        sys.argv = saved
    return code, capsys.readouterr().err + message


def run_here(args: list[str], capsys) -> str:
    """``run_module_here`` for a command that must succeed; what it wrote to stderr."""
    code, stderr = run_module_here(args, capsys)
    assert code == 0, f"python -m {' '.join(args)} exited {code}\n{stderr[-4000:]}"
    return stderr
