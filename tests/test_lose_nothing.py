"""Lose nothing, rounds two and three (issues 24 and 31): the shard directory as a guarded resource,
fresh runs that never overwrite old ones, no file that runs code when loaded, no silent hang, every
door validated. Each case's docstring says what is expected
(bench/faults.py prints them as a table)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_gan.config import ConfigError, DataConfig, load_config
from dist_gan.data import DataError, prepare_shards, shards_from_folder
from dist_gan.data.shards import SHARD_MANIFEST, verify_shards
from dist_gan.data.sources import FolderImageSet

from conftest import REPO, missing_prerequisite, read_metrics, run_cli, start_cli, wait_for
from helpers import TINY_SYNTHETIC, run_module_here

pytestmark = pytest.mark.tier("unit")

ACCELERATE_CPU = ["--main_process_port", "0", "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"),
                  "--num_processes", "2"]
# One process, synthetic images in memory, tiny nets: the run directory's mechanics in seconds
TINY = ["configs/mnist_dcgan.yaml", *TINY_SYNTHETIC]


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A flat folder of 40 RGB 40x40 PNGs."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB").save(folder / f"{i:03d}.png")
    return folder


def folder_cfg(images: Path, shards: str) -> DataConfig:
    return load_config(None, {"data.folder": str(images), "data.resolution": 32, "data.channels": 3,
                              "data.shards": shards, "data.shard_size": 16}).data


def other_shards(directory: Path) -> None:
    """A shard set of another source (synthetic 32 px RGB) in ``directory``."""
    prepare_shards(load_config(None, {"data.source": "synthetic", "data.resolution": 32, "data.channels": 3,
                                      "data.shard_size": 4096}).data, directory, progress=False)


def test_a_folder_run_never_overwrites_another_sources_shards(tmp_path, images):
    """A folder run pointed at another source's shard directory is refused, naming both; nothing changes."""
    other_shards(tmp_path / "shards")
    before = digest(tmp_path / "shards")
    with pytest.raises(DataError, match=r"holds the shards of data.source=synthetic.*data.folder=.*nothing was changed"):
        shards_from_folder(folder_cfg(images, str(tmp_path / "shards" / "train-{000000..000001}.tar")),
                           tmp_path / "run", may_prepare=True)
    assert digest(tmp_path / "shards") == before


def test_a_failed_folder_rewrite_keeps_the_old_shards_and_manifest(tmp_path, images):
    """A folder rewrite that fails (an unreadable image under data.strict) leaves the old shards and manifest whole."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in images.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    shards = str(tmp_path / "shards" / "train-000000.tar")
    first = shards_from_folder(folder_cfg(folder, shards), tmp_path / "run", may_prepare=True)
    before = digest(tmp_path / "shards")
    (folder / "zz_broken.png").write_bytes(b"not a png")
    strict = load_config(None, {"data.folder": str(folder), "data.resolution": 32, "data.channels": 3,
                                "data.shards": shards, "data.shard_size": 16, "data.strict": True}).data
    with pytest.raises(DataError, match="zz_broken.png"):
        shards_from_folder(strict, tmp_path / "run", may_prepare=True)
    assert digest(tmp_path / "shards") == before
    assert not list((tmp_path / "shards").glob(".*.tmp")) and not list((tmp_path / "shards").glob("*.json.tmp"))
    # the old shards still serve the old images, and a non-strict run rewrites them (staged, then swapped)
    again = shards_from_folder(folder_cfg(folder, shards), tmp_path / "run", may_prepare=True)
    assert again.shards != "" and first.manifest == again.manifest
    assert verify_shards(again.shards, again.manifest) == []


def test_a_full_disk_while_writing_folder_shards_is_one_line_and_changes_nothing(tmp_path, small_tmpfs):
    """Disk full while writing folder shards: one line naming the device; the shards and manifest already there stay."""
    big = tmp_path / "big"
    big.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(big / f"{i:03d}.png")
    shards = str(small_tmpfs / "shards" / "train-000000.tar")
    cfg = load_config(None, {"data.folder": str(big), "data.resolution": 64, "data.channels": 3,
                             "data.shards": shards}).data
    shards_from_folder(cfg, tmp_path / "run", may_prepare=True)
    before = digest(small_tmpfs / "shards")
    for i in range(12, 300):  # more images than the disk has room for
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(big / f"{i:03d}.png")
    stat = os.statvfs(small_tmpfs)
    with open(small_tmpfs / "ballast", "wb") as f:
        f.write(b"\0" * max(stat.f_bavail * stat.f_frsize - 2_000_000, 0))
    with pytest.raises(DataError, match=f"no space left on {small_tmpfs} while writing train shards"):
        shards_from_folder(cfg, tmp_path / "run", may_prepare=True)
    assert digest(small_tmpfs / "shards") == before


PREPARE_RACE = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from dist_gan.config import load_config
from dist_gan.data import shards_from_folder, _prepare_if_missing
kind, target, folder = sys.argv[1:4]
if kind == "folder":
    cfg = load_config(None, {"data.folder": folder, "data.resolution": 32, "data.channels": 3,
                             "data.shards": target, "data.shard_size": 16}).data
    shards_from_folder(cfg, "unused-run-dir", may_prepare=True)
else:
    cfg = load_config(None, {"data.source": "synthetic", "data.resolution": 32, "data.channels": 3,
                             "data.shards": target, "data.shard_size": 4096}).data
    _prepare_if_missing(cfg)
print("OK")
"""


@pytest.mark.tier("e2e")
@pytest.mark.parametrize("kind", ["folder", "source"])
def test_two_runs_preparing_one_shard_directory_take_turns(tmp_path, images, kind):
    """Two processes preparing the same new shard directory at once: one writes, the other waits and reuses; shards match the manifest."""
    target = (str(tmp_path / "shards" / "train-000000.tar") if kind == "folder"
              else str(tmp_path / "shards" / "train-{000000..000001}.tar"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_RACE, kind, target, str(images)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 and "OK" in out for p, out in zip(procs, outputs)), outputs
    manifest = tmp_path / "shards" / SHARD_MANIFEST
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar") if kind == "folder" else target
    assert verify_shards(pattern, str(manifest)) == []
    text = "\n".join(outputs)
    # one writer; the other waited and reused its shards (or, started late, found them written)
    assert text.count("wrote ") == 1, text


def test_a_manifest_that_matches_no_file_says_how_to_rebuild(tmp_path, images):
    """A folder manifest whose shards are gone is an error that says how to rebuild."""
    shards = str(tmp_path / "shards" / "train-000000.tar")
    shards_from_folder(folder_cfg(images, shards), tmp_path / "run", may_prepare=True)
    for tar in (tmp_path / "shards").glob("train-*.tar"):
        tar.unlink()
    with pytest.raises(DataError, match=r"delete .*manifest.json and the run rewrites the shards"):
        shards_from_folder(folder_cfg(images, shards), tmp_path / "run", may_prepare=True)


def test_run_and_shard_directories_inside_the_image_folder_are_refused(tmp_path, images):
    """A run directory or shard directory inside data.folder is refused (its grids would become images)."""
    with pytest.raises(DataError, match="run.dir .* is inside data.folder"):
        from dist_gan.data import build_batch_stream

        build_batch_stream(folder_cfg(images, "data/mnist/train-{000000..000005}.tar"), 0, 0, 1, "cpu",
                           may_prepare=True, run_dir=images / "run")
    with pytest.raises(DataError, match="the shard directory .* is inside data.folder"):
        shards_from_folder(folder_cfg(images, str(images / "shards" / "train-000000.tar")), tmp_path / "run",
                           may_prepare=True)


@pytest.mark.parametrize("mode,value,expected", [
    ("1", 1, 255), ("L", 128, 128), ("P", 3, None), ("RGB", (10, 20, 30), None), ("RGBA", (10, 20, 30, 255), None),
    ("CMYK", (0, 0, 0, 0), 255), ("YCbCr", (128, 128, 128), 128), ("LA", (200, 255), 200),
    ("I;16", 32768, 128), ("I;16", 65535, 255), ("I", 32768, 128), ("F", 0.5, 128), ("F", 200.0, 200),
])
def test_every_image_mode_pillow_reads_is_converted_by_scaling(tmp_path, mode, value, expected):
    """Every Pillow mode (16-bit, 32-bit, float grey included) becomes 8-bit grey and RGB by scaling, not clipping."""
    suffix = ".tiff" if mode in ("CMYK", "F", "I", "YCbCr") else ".png"
    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), value, np.uint16))
    elif mode == "I":
        image = Image.fromarray(np.full((8, 8), value, np.int32), "I")
    elif mode == "F":
        image = Image.fromarray(np.full((8, 8), value, np.float32), "F")
    else:
        image = Image.new(mode, (8, 8), value)
    image.save(tmp_path / f"a{suffix}")
    for channels in (1, 3):
        pixels, _ = FolderImageSet(tmp_path, 8, channels)[0]
        assert pixels.shape == (channels, 8, 8) and pixels.dtype == torch.uint8
        if expected is not None and channels == 1:
            assert int(pixels[0, 0, 0]) == pytest.approx(expected, abs=1)


def test_non_finite_config_floats_are_refused():
    """NaN and inf are refused for every float key (nan passes every range check)."""
    for key, value in (("train.ema_kimg", "nan"), ("optim.g_lr", "inf"), ("loss.r1_gamma", "-inf"),
                       ("augment.p", ".nan")):
        with pytest.raises(ConfigError, match=f"{key} = .* is not a finite number"):
            load_config(None, {key: value})


@pytest.mark.tier("e2e")
def test_a_fresh_run_never_overwrites_another_runs_checkpoints(tmp_path):
    """A fresh run in a run.dir with checkpoints is refused (resume or --run.overwrite); overwrite starts clean."""
    run = tmp_path / "run"
    run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=2", "--run.ckpt_every=2"])
    before = digest(run / "checkpoints" / "step_00000002")
    config_before = (run / "config.yaml").read_text()
    proc = run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=3",
                    "--model.z_dim=16"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "holds another run's checkpoints (newest step_00000002)" in proc.stderr
    assert "--train.resume=auto" in proc.stderr and "--run.overwrite=true" in proc.stderr
    assert digest(run / "checkpoints" / "step_00000002") == before
    assert (run / "config.yaml").read_text() == config_before
    run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=1", "--run.ckpt_every=1",
             "--run.overwrite=true"])
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    assert [r["event"] for r in read_metrics(run) if "event" in r][0] == "start"

    # resuming with nothing to train, or with another batch size, changes nothing and says so
    config_before = (run / "config.yaml").read_text()
    nothing = run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=1",
                       "--train.resume=auto"], check=False)
    assert nothing.returncode == 1 and "is at step 1 and train.max_steps=1" in nothing.stderr
    other = run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=3",
                     "--train.resume=auto", "--data.batch_size=4"], check=False)
    assert other.returncode == 1 and "data.batch_size=4 (the checkpoint has 8)" in other.stderr
    assert (run / "config.yaml").read_text() == config_before
    assert "Traceback" not in nothing.stderr + other.stderr


@pytest.mark.tier("e2e")
def test_an_export_is_refused_into_a_used_folder_checked_on_load_and_carries_no_local_paths(tmp_path):
    """export --out into a non-empty folder is refused (--overwrite replaces); a damaged export is named on load; no local paths."""
    from dist_gan.tools.export import load_generator

    run = tmp_path / "run"
    run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=1", "--run.ckpt_every=1"])
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = run_cli(["dist_gan.export", str(run), f"--out={out}"], check=False)
    assert refused.returncode == 1 and "is not empty" in refused.stderr and "--overwrite" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    to_file = run_cli(["dist_gan.export", str(run), f"--out={out / 'notes.txt'}"], check=False)
    assert to_file.returncode == 1 and "is a file" in to_file.stderr
    run_cli(["dist_gan.export", str(run), f"--out={out}", "--overwrite"])
    info = json.loads((out / "config.json").read_text())
    assert str(tmp_path) not in (out / "config.json").read_text() and str(tmp_path) not in (out / "README.md").read_text()
    assert "https://github.com/)" not in (out / "README.md").read_text()
    assert len(info["sha256"]["model.safetensors"]) == 64
    load_generator(out)
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[:-8] + bytes(8))
    with pytest.raises(ConfigError, match="model.safetensors does not match the sha256"):
        load_generator(out)
    (out / "model.safetensors").write_bytes(b"\xff" * 64)
    info.pop("sha256")
    (out / "config.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="model.safetensors cannot be loaded"):
        load_generator(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_generator(out)


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory) -> Path:
    """A finished one-step run for the commands that read a run directory."""
    run = tmp_path_factory.mktemp("one_step") / "run"
    run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=1", "--run.ckpt_every=1"])
    return run


@pytest.mark.parametrize("args,message", [
    (["dist_gan.sample", "RUN", "--truncaton=0.5"], "unknown option --truncaton; did you mean --truncation?"),
    (["dist_gan.sample", "RUN", "--truncation=abc"], "--truncation='abc' must be a number"),
    (["dist_gan.sample", "RUN", "--seed=abc"], "--seed='abc' must be a whole number"),
    (["dist_gan", "sample", "RUN", "--nn=4"], "dist-gan sample: error: unknown option --nn; did you mean --n?"),
    (["dist_gan.evaluate", "RUN", "--n=5"], "--n=5 must be a whole number >= 10"),
    (["dist_gan.evaluate", "RUN", "--n=-5"], "--n=-5 must be a whole number >= 10"),
    (["dist_gan.export", "RUN", "--out=X", "--overwrte"], "did you mean --overwrite?"),
    (["dist_gan.sample", "RUN", "--out=READONLY/grid.png"], "cannot write --out="),
    (["dist_gan.sample", "RUN", "--truncation=nan"], "--truncation='nan' must be a finite number"),
    (["dist_gan.sample", "RUN", "--truncation=inf"], "--truncation='inf' must be a finite number"),
    (["dist_gan.sample", "RUN", "--nrow=-3"], "--nrow=-3 must be a whole number >= 1"),
    (["dist_gan.sample", "RUN", "--classes=a,b"], "'a' is not a whole number"),
    (["dist_gan.sample", "RUN", "--classes=5.5"], "'5.5' is not a whole number"),
    (["dist_gan.evaluate", "RUN", "--split=val"], "--split='val' must be one of ['train', 'test']"),
    (["dist_gan.data", "verify", "pipe:cat x-{000000..000001}.tar"], "verify reads local shard files"),
])
def test_cli_arguments_are_validated_in_one_line(tmp_path, args, message, one_step_run, capsys):
    """Unknown flags (with a did-you-mean), mistyped values, evaluate --n below 10, an unwritable
    --out: one line. (In this process: the same code as ``python -m``, without a start-up each.)"""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    if os.geteuid() == 0 and "READONLY" in " ".join(args):
        readonly.chmod(0o700)
        (readonly / "grid.png").mkdir()  # root writes anywhere: a folder where the file should go instead
    args = [a.replace("RUN", str(one_step_run)).replace("READONLY", str(readonly)) for a in args]
    code, stderr = run_module_here(args, capsys)
    assert code != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert message in stderr, stderr[-2000:]


@pytest.mark.tier("e2e")
def test_unguessable_shard_names_are_one_line(tmp_path, mnist_dir):
    proc = run_cli(["dist_gan.train", "configs/mnist_wgangp.yaml", "--data.shards=x/x-{000000..000001}.tar",
                    f"--data.mnist_dir={mnist_dir}", f"--run.dir={tmp_path / 'train'}"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "shards written from data.source=mnist are named train-NNNNNN.tar" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.tier("e2e")
def test_evaluate_honours_its_feature_net(tmp_path, monkeypatch):
    """evaluate RUN --feature_net=X evaluates with X, not the run's own feature network."""
    from dist_gan.tools.evaluation import evaluate_checkpoint

    run = tmp_path / "run"
    run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=1", "--run.ckpt_every=1"])
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    results = evaluate_checkpoint(run, 32, feature_net="helpers:tiny_feature_net")
    assert results["_source"]["feature_net"] == "helpers:tiny_feature_net"
    assert len(results["generated"]) > 0


@pytest.mark.tier("e2e")
def test_a_tracker_that_cannot_start_is_one_line(tmp_path):
    """--run.trackers=mlflow with no usable tracking URI: one line naming mlflow and what to set."""
    try:
        import mlflow  # noqa: F401 (the dev extra installs mlflow-skinny)
    except ImportError:
        missing_prerequisite("mlflow is not installed (pip install -e '.[dev]')")
    proc = run_cli(["dist_gan.train", *TINY, f"--run.dir={tmp_path / 'run'}", "--train.max_steps=1",
                    "--run.trackers=mlflow"], check=False,
                   env={"MLFLOW_TRACKING_URI": "unsupported-scheme://nowhere"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "run.trackers: mlflow could not start" in proc.stderr and "MLFLOW_TRACKING_URI" in proc.stderr


@pytest.mark.tier("multiprocess")
@pytest.mark.slow
def test_dist_gan_launch_keeps_the_runs_exit_status_and_one_line_errors(tmp_path, mnist_dir):
    """dist-gan launch: a rank-0 failure is one line per rank and no launcher traceback; SIGTERM exits 75."""
    bad = run_cli(["dist_gan", "launch", *ACCELERATE_CPU, "configs/mnist_wgangp.yaml", f"--run.dir={tmp_path / 'bad'}",
                   f"--data.shards={tmp_path / 'nowhere'}/train-{{000000..000001}}.tar",
                   "--data.mnist_dir=" + str(tmp_path / "no-mnist")], check=False)
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr and "CalledProcessError" not in bad.stderr, bad.stderr[-3000:]
    errors = [line for line in bad.stderr.splitlines() if "error:" in line]
    assert any(line.startswith("dist_gan.train: error:") and "no-mnist" in line for line in errors), errors
    assert any("rank 1: rank 0 or another rank stopped" in line for line in errors), errors

    run = tmp_path / "run"
    proc = start_cli(["dist_gan", "launch", *ACCELERATE_CPU, *TINY, f"--run.dir={run}",
                      "--train.max_steps=100000", "--run.ckpt_every=100000"], log=tmp_path / "launch.log")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and any("loss_D" in r for r in read_metrics(run)),
             300, "a logged step", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 75, (tmp_path / "launch.log").read_text()[-3000:]
    assert any(r.get("event") == "preempted" for r in read_metrics(run))
    assert "Traceback" not in (tmp_path / "launch.log").read_text()


def test_a_checkpoint_with_a_non_finite_ema_is_marked_unhealthy(tmp_path):
    """The checkpoint's health covers the EMA too: NaN in the averaged generator marks it unhealthy."""
    import contextlib

    from dist_gan.run import backend
    from dist_gan.run.checkpoint import list_checkpoints
    from dist_gan.run.loop import Run
    from dist_gan.run.retention import is_healthy

    config = load_config(TINY[0], {**dict(a[2:].split("=", 1) for a in TINY[1:]), "run.dir": str(tmp_path / "run"),
                                   "run.trackers": "[]"})
    acc_G, acc_D = backend.make_accelerators(config)
    with contextlib.ExitStack() as stack:
        run = Run(config, acc_G, acc_D, stack)
        run.start(None)
        run.checkpoint(1)
        with torch.no_grad():
            next(run.ema.model.parameters()).view(-1)[0] = float("nan")
        run.checkpoint(2)
    first, second = list_checkpoints(tmp_path / "run")
    assert is_healthy(first) and not is_healthy(second)


@pytest.mark.tier("e2e")
def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path):
    """A run.dir that cannot be created or written (read-only, under a file) is one line naming it."""
    (tmp_path / "a_file").write_text("x")
    proc = run_cli(["dist_gan.train", *TINY, f"--run.dir={tmp_path / 'a_file' / 'run'}", "--train.max_steps=1"],
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"cannot write run.dir {tmp_path / 'a_file' / 'run'}" in proc.stderr


# --- round three (issue 31): no file runs code, nothing deleted early, no silent hang, every door -----

class _Marker:
    """Unpickling this creates the file ``path``: what a malicious file would do, harmlessly."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(path: Path, marker: Path, torch_format: bool = True) -> None:
    """A file at ``path`` that creates ``marker`` when it is unpickled."""
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        torch.save({"state": _Marker(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({b"data": _Marker(marker), b"labels": [0]}, protocol=2))


def _replace_in_checkpoint(checkpoint: Path, name: str, marker: Path) -> None:
    """Plant a marker file as checkpoint file ``name`` with its manifest entry made to match, so
    that only the loader's refusal to run code stands between it and the marker."""
    from dist_gan.core.fsutil import crc32_of

    _plant(checkpoint / name, marker)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = (checkpoint / name).stat().st_size
    manifest["crc32"][name] = crc32_of(checkpoint / name)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _copy_run(run: Path, where: Path) -> Path:
    import shutil

    shutil.copytree(run, where)
    (where / "run.lock").unlink(missing_ok=True)
    return where


@pytest.mark.tier("e2e")
@pytest.mark.parametrize("name", ["G/optimizer.bin", "D/random_states_0.pkl", "trainer_state.pt"])
def test_a_checkpoint_file_that_would_run_code_is_refused_unread(tmp_path, one_step_run, name):
    """A checkpoint pickle naming anything but tensors and arrays is refused unread, on resume and sample; no marker."""
    marker = tmp_path / "MARKER"
    run = _copy_run(one_step_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step_00000001"
    _replace_in_checkpoint(checkpoint, name, marker)
    proc = run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=2", "--train.resume=auto"],
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "could run code" in proc.stderr and name in proc.stderr
    sampled = run_cli(["dist_gan.sample", str(run), f"--out={tmp_path / 'grid.png'}"], check=False)
    assert not marker.exists()
    if name == "trainer_state.pt":  # the only file sample reads besides safetensors
        assert sampled.returncode == 1 and "could run code" in sampled.stderr


@pytest.mark.tier("cluster")
def test_the_checkpoint_scan_admits_what_accelerate_and_deepspeed_write(tmp_path):
    """The scan admits NumPy arrays and DeepSpeed's state classes, refuses any other callable, and never unpickles."""
    import numpy as np

    from dist_gan.run.checkpoint import CheckpointError, refuse_code_in_pickles

    torch.save({"random_state": np.random.get_state(), "step": 3, "w": torch.ones(2)}, tmp_path / "ok.pkl")
    refuse_code_in_pickles(tmp_path)
    marker = tmp_path / "MARKER"
    _plant(tmp_path / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(CheckpointError, match=r"names (io|builtins).open.*could run code"):
        refuse_code_in_pickles(tmp_path)
    (tmp_path / "bare.pt").write_bytes(b"\x80\x02N.")  # a pickle that is no torch.save archive
    (tmp_path / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="bare.pt is not a torch.save archive"):
        refuse_code_in_pickles(tmp_path)
    assert not marker.exists()


def test_weights_statistics_and_caches_that_would_run_code_are_never_unpickled(tmp_path, monkeypatch,
                                                                                reference_classifier):
    """Classifier, FID Inception (named, or torch hub's cache), torchvision weights, reference statistics, embedding caches, CIFAR-10: no marker."""
    import numpy as np
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from dist_gan.config import Config
    from dist_gan.data.sources import CIFAR10_FILES, CIFAR10_FOLDER, cifar10_source
    from dist_gan.metrics import Embedder
    from dist_gan.metrics.classifier import load_or_train_classifier
    from dist_gan.metrics.evaluator import load_reference, real_embeddings
    from dist_gan.metrics.networks import InceptionFeatures, TorchvisionFeatures

    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    _plant(evil, marker)
    with pytest.raises(ConfigError, match="is not a dist_gan MNIST classifier"):
        load_or_train_classifier(None, evil)
    with pytest.raises(ConfigError, match="cannot load the FID Inception weights from eval.feature_weights"):
        InceptionFeatures(str(evil))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # the hub cache the help points at
    _plant(tmp_path / "torch_home" / "hub" / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1], marker)
    with pytest.raises(ConfigError, match="cannot load the FID Inception weights"):
        InceptionFeatures(None)
    with pytest.raises(ConfigError, match="eval.feature_weights=.*cannot be loaded"):
        TorchvisionFeatures("resnet18", str(evil))

    stats = tmp_path / "stats.npz"  # an object array: a pickle inside the npz
    np.savez(stats, mean=np.zeros(4), cov=np.eye(4), meta=np.array([_Marker(marker)], dtype=object))
    with pytest.raises(ConfigError, match="eval.reference_stats"):
        load_reference(stats, Config(), reference_classifier[0])

    data = load_config(None, {"data.source": "synthetic"}).data
    embed = Embedder(reference_classifier[0], 512, "cpu")
    first, _ = real_embeddings(data, "test", embed)
    caches = list(Path(os.environ["DIST_GAN_CACHE"], "real_embeddings").glob("synthetic-*.pt"))
    assert caches
    for cache in caches:
        _plant(cache, marker)
    again, _ = real_embeddings(data, "test", embed)  # the damaged cache is computed again
    assert torch.equal(first, again)

    batches = tmp_path / "cifar" / CIFAR10_FOLDER
    for name in CIFAR10_FILES["train"] + CIFAR10_FILES["test"] + ["batches.meta"]:
        _plant(batches / name, marker, torch_format=False)
    with pytest.raises(DataError, match=r"names (io|builtins).open, which a CIFAR-10 batch never holds"):
        cifar10_source(load_config(None, {"data.source": "cifar10", "data.root": str(tmp_path / "cifar"),
                                          "data.resolution": 32, "data.channels": 3}).data)
    assert not marker.exists()


def test_the_cifar10_unpickler_reads_real_batches(tmp_path):
    """Batches pickled as CIFAR-10's are (protocol 2, a uint8 array, byte keys) read; an array of objects is refused."""
    import pickle

    import numpy as np

    from dist_gan.data.sources import CIFAR10_FOLDER, cifar10_source

    folder = tmp_path / CIFAR10_FOLDER
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": b"x", b"labels": [int(v) for v in rng.integers(0, 10, 4)],
                 b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"filenames": [b"a"] * 4}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat"] * 10}, protocol=2))
    cfg = load_config(None, {"data.source": "cifar10", "data.root": str(tmp_path), "data.resolution": 32,
                             "data.channels": 3}).data
    images = cifar10_source(cfg)
    assert len(images) == 20 and images.class_names[0] == "cat"


def test_a_symlink_out_of_an_image_folder_is_skipped_unless_asked(tmp_path, caplog):
    """A link leaving an image folder is skipped with a warning naming it; data.follow_symlinks=true reads it."""
    folder, outside = tmp_path / "folder", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), "L").save(folder / f"{i}.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8), "L").save(outside / "elsewhere.png")
    (folder / "link.png").symlink_to(outside / "elsewhere.png")
    (folder / "passwd.png").symlink_to("/etc/passwd")
    (folder / "inside.png").symlink_to(folder / "0.png")  # a link within the folder is fine
    with caplog.at_level("WARNING"):
        names = sorted(p.name for p, _ in FolderImageSet(folder, 8, 1).items)
    assert names == ["0.png", "1.png", "inside.png"]
    assert "skipped 2 symbolic link(s) leading out of it" in caplog.text and "follow_symlinks" in caplog.text
    followed = sorted(p.name for p, _ in FolderImageSet(folder, 8, 1, follow_symlinks=True).items)
    assert "link.png" in followed


def test_a_flat_folder_keeps_its_images_beside_hidden_folders_and_refuses_mixed_layouts(tmp_path):
    """A flat folder with .ipynb_checkpoints/ keeps its images; images beside class folders are refused naming both."""
    folder = tmp_path / "flat"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(folder / f"{i}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(folder / ".ipynb_checkpoints" / "0-checkpoint.png")
    flat = FolderImageSet(folder, 8, 1)
    assert len(flat) == 3 and flat.class_names == [] and {label for _, label in flat.items} == {-1}
    (folder / "cats").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(folder / "cats" / "c.png")
    with pytest.raises(DataError, match=r"holds both images \(0.png, ...\) and sub-folders \(cats/, ...\)"):
        FolderImageSet(folder, 8, 1)


@pytest.mark.tier("e2e")
def test_overwrite_deletes_the_earlier_run_only_once_the_new_one_has_a_checkpoint(tmp_path):
    """run.overwrite: a failed start leaves the earlier run whole; a started run replaces all of it (grids, events, metrics)."""
    run = tmp_path / "run"
    run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=2", "--run.ckpt_every=1",
             "--run.sample_every=1"])
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert any(p.parts[0] == "samples" for p in before)
    typo = run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=1", "--run.overwrite=true",
                    "--data.format=shards", f"--data.shards={tmp_path}/nowhere-{{000000..000001}}.tar",
                    "--data.prepare_if_missing=false"], check=False)
    assert typo.returncode == 1 and "Traceback" not in typo.stderr, typo.stderr[-2000:]
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before, "the failed start changed the earlier run"
    run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=1", "--run.ckpt_every=1",
             "--run.overwrite=true", "--run.sample_every=100"])
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["ema_00000001.png"]
    assert [r["event"] for r in read_metrics(run) if "event" in r].count("start") == 1
    assert len(list(run.glob("events.out.tfevents.*"))) <= 1 and not (run / ".overwritten").exists()


def test_an_overwrite_interrupted_by_a_kill_is_settled_at_the_next_start(tmp_path):
    """A kill while the earlier run was set aside: before the first checkpoint it comes back, after it is deleted."""
    from dist_gan.run.rundir import ASIDE, settle_interrupted_overwrite

    run = tmp_path / "run"
    (run / ASIDE / "checkpoints" / "step_00000005").mkdir(parents=True)
    (run / ASIDE / "checkpoints" / "step_00000005" / "manifest.json").write_text("{}")
    (run / ASIDE / "metrics.jsonl").write_text("old\n")
    (run / "metrics.jsonl").write_text("new, never checkpointed\n")
    settle_interrupted_overwrite(run)
    assert (run / "metrics.jsonl").read_text() == "old\n" and (run / "checkpoints" / "step_00000005").is_dir()
    assert not (run / ASIDE).exists()
    (run / ASIDE).mkdir()
    (run / ASIDE / "metrics.jsonl").write_text("older\n")
    settle_interrupted_overwrite(run)  # the run in place has a checkpoint: the aside one goes
    assert not (run / ASIDE).exists() and (run / "metrics.jsonl").read_text() == "old\n"


@pytest.mark.tier("e2e")  # the loader starts the pipe: command (curl, cat)
def test_a_stalled_pipe_command_times_out_naming_it(tmp_path, caplog):
    """A pipe: shard command that sends nothing fails its read after data.read_timeout_s, named and counted."""
    import time

    from helpers import stream, tiny_shards

    _, _ = tiny_shards(tmp_path, n_shards=2)
    urls = f"pipe:cat {tmp_path}/train-000000.tar::pipe:sleep 600; cat {tmp_path}/train-000001.tar"
    start = time.monotonic()
    with caplog.at_level("WARNING"):
        s = stream(urls, manifest=str(tmp_path / SHARD_MANIFEST), read_timeout_s=1.0, workers=0)
        try:
            labels = [int(v) for _ in range(8) for v in s.next_batch()[1]]
            counters = s.counters()
        finally:
            s.close()
    assert time.monotonic() - start < 120
    assert counters["data_bad_shards"] >= 1 and set(labels) <= set(range(24))
    assert "pipe command 'sleep 600; cat" in caplog.text and "sent nothing for 1 s" in caplog.text


def test_the_progress_animation_is_capped_and_shrunk(tmp_path):
    """The end-of-run GIF shows at most 48 grids, first and last kept, at most 1024 px wide."""
    from dist_gan.tools.progress import MAX_FRAME_WIDTH, MAX_FRAMES, grids, write_progress

    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(1, 61):
        Image.fromarray(np.full((16, 1100, 3), i * 4, np.uint8), "RGB").save(samples / f"ema_{i:08d}.png")
    out = write_progress(tmp_path, tmp_path / "progress.gif")
    with Image.open(out) as gif:
        assert gif.n_frames == MAX_FRAMES and gif.width == MAX_FRAME_WIDTH
        gif.seek(gif.n_frames - 1)
        assert gif.info["duration"] == 2000  # the last grid, held
    assert len(grids(tmp_path)) == 60


def test_ramps_need_every_part_and_stay_in_their_keys_range():
    """A ramp given only start, a beta2 ramp to 1.0, a learning rate ramp to 0: refused naming the key."""
    with pytest.raises(ConfigError, match="schedule.g_lr needs end, kimg"):
        load_config(None, {"schedule.g_lr.start": 0.001})
    for key, (start, end), rule in (("beta2", (0.9, 1.0), r"in \[0, 1\), as optim.betas"),
                                    ("g_lr", (0.001, 0), "> 0, as optim.g_lr"),
                                    ("augment_p", (0, 1.5), r"in \[0, 1\], as augment.p")):
        overrides = {f"schedule.{key}.start": start, f"schedule.{key}.end": end, f"schedule.{key}.kimg": 10}
        if key == "augment_p":
            overrides.update({"augment.kind": "diffaugment", "augment.target": None})
        with pytest.raises(ConfigError, match=f"schedule.{key} = .*{rule}"):
            load_config(None, overrides)


@pytest.mark.tier("e2e")
def test_a_run_whose_last_steps_were_all_skipped_exits_non_zero(tmp_path):
    """A run ending inside a bad streak (nothing saved at the end) exits 1 naming the last good checkpoint."""
    run = tmp_path / "run"
    proc = run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=6", "--run.ckpt_every=100",
                    "--optim.g_lr=1e30", "--optim.d_lr=1e30", "--train.max_bad_steps=1000"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "the run ended inside a bad streak" in proc.stderr and "last good checkpoint: None" in proc.stderr
    assert [r for r in read_metrics(run) if r.get("event") == "diverged"]


def test_a_named_classifier_that_does_not_exist_is_refused_not_trained(tmp_path, mnist_dir, capsys):
    """eval.classifier_path naming no file is refused (nothing trained there); train-classifier --limit 0 or -5 too."""
    from dist_gan.metrics.classifier import load_or_train_classifier

    absent = tmp_path / "mine.pt"
    with pytest.raises(FileNotFoundError, match="eval.classifier_path=.*mine.pt: no such file"):
        load_or_train_classifier(str(mnist_dir), absent)
    assert not absent.exists()
    for limit in ("0", "-5"):
        code, stderr = run_module_here(["dist_gan.metrics", "train-classifier", f"--mnist_dir={mnist_dir}",
                                        f"--out={absent}", f"--limit={limit}"], capsys)
        assert code != 0 and f"--limit={limit} must be a whole number >= 1" in stderr
    assert not absent.exists()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ConfigError, match="corrupt.pt is not a dist_gan MNIST classifier"):
        load_or_train_classifier(None, corrupt)


def test_a_folder_run_is_measured_against_its_folder_and_caches_are_keyed_by_the_files(tmp_path,
                                                                                       reference_classifier):
    """A data.folder run's real statistics come from its folder (not MNIST's), keyed by the folder's files."""
    from dist_gan.metrics import Embedder
    from dist_gan.metrics.evaluator import real_embeddings

    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((28, 28), 50 * i, np.uint8), "L").save(folder / f"{i}.png")
    data = load_config(None, {"data.folder": str(folder)}).data
    assert load_config(None, {"data.folder": str(folder)}).eval.resolved_feature_net(data) == "inception"
    embed = Embedder(reference_classifier[0], 64, "cpu")
    feats, _ = real_embeddings(data, "train", embed)
    assert len(feats) == 5  # the folder, not MNIST's 60,000
    Image.fromarray(np.full((28, 28), 255, np.uint8), "L").save(folder / "5.png")
    feats, _ = real_embeddings(data, "train", embed)
    assert len(feats) == 6  # the folder changed: its cached embeddings are not reused


@pytest.mark.tier("e2e")
@pytest.mark.slow
def test_export_card_snippets_run_overwrite_replaces_whole_and_a_full_disk_keeps_the_export(tmp_path, small_tmpfs):
    """Every snippet of a stylegan2 export's card runs; --overwrite leaves no stale generator.onnx; a full disk or a damaged config.json is one line."""
    import re
    import shutil

    from dist_gan.tools.export import ONNX_FILE, load_generator

    run = tmp_path / "run"
    run_cli(["dist_gan.train", "configs/folder256_stylegan2.yaml", "--data.folder=null", "--data.source=synthetic",
             "--data.format=memory", "--data.resolution=32", "--data.batch_size=4", "--model.generator.width=4",
             "--model.discriminator.width=4", "--model.generator.mapping_layers=2", f"--run.dir={run}",
             "--train.max_steps=1", "--run.ckpt_every=1", "--eval.every=0", "--run.trackers=[]",
             "--train.mixed_precision=no"])
    out = tmp_path / "export"
    run_cli(["dist_gan.export", str(run), f"--out={out}", "--onnx"])
    card = (out / "README.md").read_text()
    assert "not clamped" in card
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 2
    for snippet in snippets:
        proc = subprocess.run([sys.executable, "-c", snippet], cwd=out, capture_output=True, text=True)
        assert proc.returncode == 0, f"{snippet}\n{proc.stderr[-2000:]}"
    run_cli(["dist_gan.export", str(run), f"--out={out}", "--overwrite"])
    assert not (out / ONNX_FILE).exists() and "onnx" not in json.loads((out / "config.json").read_text())

    on_tmpfs = small_tmpfs / "export"
    shutil.copytree(out, on_tmpfs)
    before = {p.name: p.read_bytes() for p in on_tmpfs.iterdir()}
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    for chunk in (1 << 20, 4096, 1):  # fill the disk to the last byte
        try:
            while os.write(fd, bytes(chunk)):
                pass
        except OSError:
            pass
    os.close(fd)
    full = run_cli(["dist_gan.export", str(run), f"--out={on_tmpfs}", "--overwrite"], check=False)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert "cannot write the export" in full.stderr and "unchanged" in full.stderr
    assert {p.name: p.read_bytes() for p in on_tmpfs.iterdir()} == before
    filler.unlink()

    info = json.loads((out / "config.json").read_text())
    for damage in ({"config": "a string"}, {"sha256": "abc"}, {"config": {**info["config"], "model": {
            **info["config"]["model"], "z_dim": "many"}}}):
        (out / "config.json").write_text(json.dumps({**info, **damage}))
        with pytest.raises(ConfigError, match="config.json"):
            load_generator(out)


def test_launch_options_before_the_config_and_one_process_refusals(tmp_path, monkeypatch):
    """Value-less launcher flags before the config do not eat it; --num_processes 2 that would start one process is refused."""
    from dist_gan.run.launcher import one_process_problem, split_arguments

    for flag in ("--cpu", "--multi_gpu", "--use_deepspeed", "--debug", "-q"):
        assert split_arguments([flag, "configs/x.yaml", "--a=1"]) == ([flag], ["configs/x.yaml", "--a=1"])
    assert split_arguments(["--config_file", "p.yaml", "c.yaml"]) == (["--config_file", "p.yaml"], ["c.yaml"])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no default accelerate profile
    import importlib

    import accelerate.commands.config as accelerate_config
    importlib.reload(accelerate_config.config_args)
    importlib.reload(accelerate_config)
    assert "starts ONE process" in one_process_problem(["--num_processes", "2"])
    assert one_process_problem(["--num_processes", "2", "--multi_gpu"]) is None
    assert one_process_problem(["--config_file", str(REPO / "launch" / "cpu_ddp.yaml"), "--num_processes", "2"]) is None
    single = tmp_path / "single.yaml"
    single.write_text("distributed_type: 'NO'\n")
    assert "distributed_type: NO" in one_process_problem(["--config_file", str(single), "--num_processes=2"])


@pytest.mark.tier("cluster")
@pytest.mark.slow
def test_dist_gan_launch_shows_its_own_errors_relays_sigusr1_and_reports_a_killed_rank(tmp_path):
    """dist-gan launch: a missing --config_file is one line; SIGUSR1 makes both ranks checkpoint and exit 75; a kill -9 of rank 1 leaves rank 0 one line."""
    missing = run_cli(["dist_gan", "launch", "--config_file", str(tmp_path / "missing.yaml"), *TINY,
                       f"--run.dir={tmp_path / 'never'}"], check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "accelerate launch failed before any rank started" in missing.stderr and "missing.yaml" in missing.stderr

    run = tmp_path / "run"
    proc = start_cli(["dist_gan", "launch", *ACCELERATE_CPU, *TINY, f"--run.dir={run}", "--train.max_steps=100000",
                      "--run.ckpt_every=100000"], log=tmp_path / "usr1.log")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and any("loss_D" in r for r in read_metrics(run)),
             300, "a logged step", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75, (tmp_path / "usr1.log").read_text()[-3000:]
    assert [r["stopped_by"] for r in read_metrics(run) if r.get("event") == "preempted"] == ["SIGUSR1"]

    killed = tmp_path / "killed"
    log = tmp_path / "kill.log"
    proc = start_cli(["dist_gan", "launch", *ACCELERATE_CPU, *TINY, f"--run.dir={killed}",
                      "--train.max_steps=100000", "--run.ckpt_every=100000"], log=log)
    wait_for(lambda: (killed / "metrics.jsonl").is_file() and any("loss_D" in r for r in read_metrics(killed)),
             300, "a logged step", proc)
    from helpers import descendants

    ranks = [pid for pid in descendants(proc.pid)
             if "dist_gan.train" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
             and b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
    assert ranks, "rank 1 not found"
    os.kill(ranks[0], signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "dist_gan.train: error: rank 0: another rank stopped or was killed" in text


@pytest.mark.tier("e2e")
def test_train_arguments_a_stray_word_or_malformed_yaml_are_one_line(tmp_path):
    """python -m dist_gan.train: a stray positional argument or a malformed YAML override is one line naming it."""
    stray = run_cli(["dist_gan.train", *TINY, "oops", f"--run.dir={tmp_path / 'a'}"], check=False)
    assert stray.returncode == 1 and "Traceback" not in stray.stderr
    assert "unexpected argument(s) ['oops']" in stray.stderr
    bad = run_cli(["dist_gan.train", *TINY, "--train.max_steps=[1", f"--run.dir={tmp_path / 'b'}"], check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "train.max_steps = '[1' is not a valid value" in bad.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
