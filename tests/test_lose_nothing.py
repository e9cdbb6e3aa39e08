"""Lose nothing, round two (issue 24): the shard directory as a guarded resource, fresh runs that never
overwrite old ones, every door validated. Each case's docstring says what is expected
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

from conftest import REPO, missing_prerequisite, read_metrics, run_cli, start_cli, wait_for
from helpers import run_module_here

from dist_gan.config import ConfigError, DataConfig, load_config
from dist_gan.data import DataError, prepare_shards, shards_from_folder
from dist_gan.data.shards import SHARD_MANIFEST, verify_shards
from dist_gan.data.sources import FolderImageSet

ACCELERATE_CPU = ["--main_process_port", "0", "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"),
                  "--num_processes", "2"]
# One process, synthetic images in memory, tiny nets: the run directory's mechanics in seconds
TINY = ["configs/mnist_dcgan.yaml", "--data.source=synthetic", "--data.format=memory",
        "--data.batch_size=8", "--model.generator.width=4", "--model.discriminator.width=4",
        "--run.log_every=1", "--run.sample_every=100"]


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


def test_an_export_is_refused_into_a_used_folder_checked_on_load_and_carries_no_local_paths(tmp_path):
    """export --out into a non-empty folder is refused (--overwrite replaces); a damaged export is named on load; no local paths."""
    from dist_gan.export import load_generator

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


def test_unguessable_shard_names_are_one_line(tmp_path, mnist_dir):
    proc = run_cli(["dist_gan.train", "configs/mnist_wgangp.yaml", "--data.shards=x/x-{000000..000001}.tar",
                    f"--data.mnist_dir={mnist_dir}", f"--run.dir={tmp_path / 'train'}"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "shards written from data.source=mnist are named train-NNNNNN.tar" in proc.stderr, proc.stderr[-2000:]


def test_evaluate_honours_its_feature_net(tmp_path, monkeypatch):
    """evaluate RUN --feature_net=X evaluates with X, not the run's own feature network."""
    from dist_gan.metrics.evaluator import evaluate_checkpoint

    run = tmp_path / "run"
    run_cli(["dist_gan.train", *TINY, f"--run.dir={run}", "--train.max_steps=1", "--run.ckpt_every=1"])
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    results = evaluate_checkpoint(run, 32, feature_net="test_metrics:tiny_feature_net")
    assert results["_source"]["feature_net"] == "test_metrics:tiny_feature_net"
    assert len(results["generated"]) > 0


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

    from dist_gan import backend
    from dist_gan.checkpoint import is_healthy, list_checkpoints
    from dist_gan.loop import Trainer

    config = load_config(TINY[0], {**dict(a[2:].split("=", 1) for a in TINY[1:]), "run.dir": str(tmp_path / "run"),
                                   "run.trackers": "[]"})
    acc_G, acc_D = backend.make_accelerators(config)
    with contextlib.ExitStack() as stack:
        trainer = Trainer(config, acc_G, acc_D, stack)
        trainer.start(None)
        trainer.checkpoint(1, last=False)
        with torch.no_grad():
            next(trainer.ema.model.parameters()).view(-1)[0] = float("nan")
        trainer.checkpoint(2, last=True)
    first, second = list_checkpoints(tmp_path / "run")
    assert is_healthy(first) and not is_healthy(second)


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path):
    """A run.dir that cannot be created or written (read-only, under a file) is one line naming it."""
    (tmp_path / "a_file").write_text("x")
    proc = run_cli(["dist_gan.train", *TINY, f"--run.dir={tmp_path / 'a_file' / 'run'}", "--train.max_steps=1"],
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"cannot write run.dir {tmp_path / 'a_file' / 'run'}" in proc.stderr
