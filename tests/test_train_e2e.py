"""End to end on real MNIST through the real entry points (subprocesses, as a user runs them)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAST, read_metrics, run_cli
from helpers import run_here, run_module_here

pytestmark = pytest.mark.tier("e2e")  # every tier but unit is also slow (conftest)


SCALARS = ["loss_D", "loss_G", "gp", "D_real", "D_fake", "wasserstein", "grad_norm_G", "grad_norm_D",
           "lr_G", "lr_D", "imgs_per_sec"]


@pytest.fixture
def data(mnist_dir, mnist_shards):
    """Command-line settings that point a run at the session's real MNIST shards."""
    return [f"--data.mnist_dir={mnist_dir}", f"--data.shards={mnist_shards}",
            "--data.prepare_if_missing=false"]


def train(config, run_dir, data, *extra, check=True):
    return run_cli(["dist_gan.train", f"configs/{config}.yaml", f"--run.dir={run_dir}", *data, *FAST,
                    *extra], check=check)


def test_thirty_steps_log_checkpoint_and_sample(tmp_path, data, capsys):
    run = tmp_path / "run"
    train("mnist_wgangp", run, data, "--train.max_steps=30", "--run.ckpt_every=20",
          "--run.keep_last=1")

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for tag in SCALARS:
        assert f"train/{tag}" in events.Tags()["scalars"], tag
    assert [e.step for e in events.Scalars("train/loss_D")] == [5, 10, 15, 20, 25, 30]
    assert "samples/ema" in events.Tags()["images"]
    assert [e.step for e in events.Images("samples/ema")] == [10, 20, 30]

    records = [r for r in read_metrics(run) if "loss_D" in r]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for record in records:
        assert {"step", "loss_D", "loss_G", "imgs_per_sec", "world_size", "gp"} <= set(record)
        assert record["world_size"] == 1 and record["imgs_per_sec"] > 0
        assert all(isinstance(record[k], float) for k in ("loss_D", "loss_G", "gp"))
        assert record["data_skipped_samples"] == 0 and record["data_bad_shards"] == 0

    # keep_last=1: the step-20 checkpoint was replaced by the final one
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_00000030"]
    ckpt = run / "checkpoints" / "step_00000030"
    for name in ("G/model.safetensors", "D/model.safetensors", "G/optimizer.bin", "D/optimizer.bin",
                 "G/random_states_0.pkl", "generator.safetensors", "trainer_state.pt", "config.yaml",
                 "manifest.json"):
        assert (ckpt / name).is_file(), name
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 30 and state["ranks"] == [{"data": {"epoch": 0, "batch": 150}}]  # 30 steps x 5 critic
    assert state["world_size"] == 1

    out = tmp_path / "grid.png"
    run_here(["dist_gan.sample", str(run), "--n=16", f"--out={out}"], capsys)
    assert Image.open(out).size == (4 * 28 + 5 * 2, 4 * 28 + 5 * 2)  # 4x4 grid with 2 px padding
    raw = tmp_path / "raw.png"
    run_here(["dist_gan", "sample", str(ckpt), "--n=16", f"--out={raw}", "--raw"], capsys)  # the fire CLI
    assert Image.open(raw).tobytes() != Image.open(out).tobytes()  # EMA and raw weights differ

    # samples named by seed: one PNG per seed, the same bytes whatever else is drawn
    by_seed, alone = tmp_path / "by_seed", tmp_path / "alone"
    run_here(["dist_gan", "sample", str(run), "--seeds=0-2,5", f"--out_dir={by_seed}"], capsys)
    assert sorted(p.name for p in by_seed.iterdir()) == ["seed0000.png", "seed0001.png", "seed0002.png",
                                                        "seed0005.png"]
    run_here(["dist_gan", "sample", str(run), "--seeds=5", f"--out_dir={alone}"], capsys)
    assert (alone / "seed0005.png").read_bytes() == (by_seed / "seed0005.png").read_bytes()
    code, stderr = run_module_here(["dist_gan.sample", str(run), "--style_mixing", "--rows=0-1", "--cols=2"],
                                   capsys)
    assert code == 1 and "--style_mixing needs a generator with a w space" in stderr

    walk = tmp_path / "walk.gif"  # a latent walk as an animation, forth and back
    run_here(["dist_gan", "sample", str(run), "--interpolate", "--n=6", f"--gif={walk}"], capsys)
    with Image.open(walk) as animation:
        assert animation.n_frames == 10 and animation.size == (28, 28)

    # export: a model folder that loads without the checkpoint layout, the config file or Accelerate
    exported = tmp_path / "exported"
    run_here(["dist_gan", "export", str(run), f"--out={exported}"], capsys)
    assert {p.name for p in exported.iterdir()} == {"model.safetensors", "config.json", "README.md",
                                                   "samples.png"}
    card = (exported / "README.md").read_text()
    assert "| steps | 30 |" in card and "mnist, 28x28" in card and "load_generator" in card
    import dist_gan
    from dist_gan.tools.generate import generator_from_checkpoint as from_checkpoint

    loaded = dist_gan.load_generator(exported)
    reference, _ = from_checkpoint(run)
    z = torch.randn(8, loaded.z_dim)
    assert not loaded.training and torch.equal(loaded(z, None), reference(z, None))


def test_resume_is_bit_exact(tmp_path, data):
    """20 steps, stop, resume to 40 == 40 uninterrupted steps, parameter for parameter."""
    common = ["--run.ckpt_every=20", "--train.max_steps=40"]
    train("mnist_dcgan", tmp_path / "straight", data, *common)
    train("mnist_dcgan", tmp_path / "split", data, *common[:1], "--train.max_steps=20")
    train("mnist_dcgan", tmp_path / "split", data, *common, "--train.resume=auto")

    records = read_metrics(tmp_path / "split")
    assert [r["resumed_from"] for r in records if r.get("event") == "start"][1].endswith("step_00000020")
    a = tmp_path / "straight" / "checkpoints" / "step_00000040"
    b = tmp_path / "split" / "checkpoints" / "step_00000040"
    for name in ("G/model.safetensors", "D/model.safetensors"):  # G (with BatchNorm buffers), D
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}:{key} differs after resume"
    ema_a = torch.load(a / "trainer_state.pt", weights_only=True)["ema"]
    ema_b = torch.load(b / "trainer_state.pt", weights_only=True)["ema"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # ...and the comparison can tell runs apart: a different seed gives different weights
    train("mnist_dcgan", tmp_path / "other", data, "--train.max_steps=2", "--run.seed=1")
    other = load_file(tmp_path / "other" / "checkpoints" / "step_00000002" / "G/model.safetensors")
    assert not all(torch.equal(other[k], load_file(a / "G/model.safetensors")[k]) for k in other)


def test_bf16_autocast_on_cpu_with_spectral_norm_and_r1(tmp_path, data):
    run = tmp_path / "bf16"
    train("mnist_dcgan", run, data, "--train.max_steps=10", "--train.mixed_precision=bf16",
          "--data.format=memory",
          "--model.discriminator.spectral_norm=true", "--model.discriminator.norm=none",
          "--loss.r1_gamma=1.0", "--optim.grad_clip=10", "--loss.name=hinge")
    records = [r for r in read_metrics(run) if "loss_D" in r]
    assert records[-1]["step"] == 10 and all(r.get("r1") is not None and r["r1"] > 0 for r in records)
    assert all(r["skipped_steps"] == 0 and math.isfinite(r["loss_D"]) for r in records)
    start = [r for r in read_metrics(run) if r.get("event") == "start"][0]
    assert start["mixed_precision"] == "bf16"


def test_config_errors_from_the_command_line(tmp_path, data):
    proc = train("mnist_wgangp", tmp_path / "x", data, "--train.max_step=3", check=False)
    assert proc.returncode != 0
    assert "unknown config key 'train.max_step'; did you mean 'train.max_steps'?" in proc.stderr
    proc = train("mnist_wgangp", tmp_path / "x", data, "--optim.n_critic=0", check=False)
    assert proc.returncode != 0 and "optim.n_critic = 0: must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, data):
    run = tmp_path / "run"
    train("mnist_wgangp", run, data, "--train.max_steps=2")
    proc = train("mnist_wgangp", run, data, "--train.max_steps=4", "--train.resume=auto",
                 "--model.generator.width=32", check=False)
    assert proc.returncode != 0
    assert "was made for another model" in proc.stderr
    assert "model.generator.width: checkpoint 16, config 32" in proc.stderr


def test_divergence_without_the_guard_stops_at_the_log_step(tmp_path, data):
    run = tmp_path / "nan"
    proc = train("mnist_dcgan", run, data, "--train.max_steps=20", "--optim.d_lr=1e30",
                 "--train.skip_nonfinite=false", check=False)
    assert proc.returncode != 0
    assert "non-finite values at step 5" in proc.stderr and "'loss_D': nan" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [r for r in read_metrics(run) if "loss_D" in r][-1]["loss_D"] is None  # NaN logged as null


def test_time_limit_stops_cleanly_with_a_checkpoint(tmp_path, data):
    run = tmp_path / "limited"
    train("mnist_dcgan", run, data, "--train.max_steps=100000", "--train.time_limit_min=0.0001")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000005"]  # first log step
    assert [r for r in read_metrics(run) if r.get("event") == "end"][0]["step"] == 5


def test_train_from_a_folder_in_one_command(tmp_path):
    """`dist-gan train --data.folder=DIR` with no config file: shards written beside the run (bad
    images skipped and counted), reused by the next run, rewritten when the folder changes."""
    import numpy as np

    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for index in range(24):
        (folder / ("cats" if index % 2 else "dogs")).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / ("cats" if index % 2 else "dogs") / f"{index}.png")
    (folder / "cats" / "broken.png").write_bytes(b"not a png")
    (folder / "dogs" / "empty.jpg").write_bytes(b"")
    run = tmp_path / "run"
    command = ["dist_gan", "train", f"--data.folder={folder}", "--data.resolution=16", "--data.channels=3",
               f"--run.dir={run}", "--data.batch_size=4", "--data.workers=0", "--model.generator.width=8",
               "--model.discriminator.width=8", "--run.log_every=2", "--run.sample_every=100"]
    first = run_cli([*command, "--train.max_steps=2"])
    assert "writing shards to" in first.stderr and "first time" in first.stderr
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["total"] == 24 and manifest["splits"]["train"]["skipped_unreadable"] == 2
    assert manifest["class_names"] == ["cats", "dogs"] and manifest["folder"]["images"] == 26
    assert [r["step"] for r in read_metrics(run) if "loss_D" in r] == [2]
    again = run_cli([*command, "--train.max_steps=4", "--train.resume=auto"])
    assert "unchanged since its shards" in again.stderr and "writing shards" not in again.stderr
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "cats" / "new.png")
    changed = run_cli([*command, "--train.max_steps=6", "--train.resume=auto"])
    assert "the folder, the resolution or the encoding changed" in changed.stderr
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["total"] == 25 and manifest["splits"]["train"]["encoding"] == "raw"
    as_png = run_cli([*command, "--train.max_steps=8", "--train.resume=auto", "--data.encoding=png"])
    assert "the folder, the resolution or the encoding changed" in as_png.stderr
    assert json.loads((run / "shards" / "manifest.json").read_text())["splits"]["train"]["encoding"] == "png"
    assert [r["step"] for r in read_metrics(run) if "loss_D" in r][-1] == 8


def test_trackers_through_accelerate_tensorboard_and_mlflow(tmp_path, data, monkeypatch):
    """run.trackers=[tensorboard, mlflow]: scalars, the sample grid and the config reach both (MLflow's
    local file store, no server; MLflow 3 wants MLFLOW_ALLOW_FILE_STORE for it); metrics.jsonl stays."""
    from mlflow.tracking import MlflowClient

    run, store = tmp_path / "tracked", f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_cli(["dist_gan.train", "configs/mnist_dcgan.yaml", f"--run.dir={run}", *data, *FAST,
             "--train.max_steps=10", "--run.trackers=tensorboard,mlflow"],
            env={"MLFLOW_TRACKING_URI": store})
    assert [r["step"] for r in read_metrics(run) if "loss_D" in r] == [5, 10]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss_D")] == [5, 10]
    client = MlflowClient(tracking_uri=store)
    [experiment] = [e for e in client.search_experiments() if e.name == "tracked"]
    [logged] = client.search_runs([experiment.experiment_id])
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "train/loss_D")] == [5, 10]
    assert logged.data.params["optim.n_critic"] == "1" and logged.data.params["run.dir"] == str(run)
    images = [a.path for a in client.list_artifacts(logged.info.run_id, "images")]
    assert any("samples_ema" in path for path in images), images  # the step-10 grid


def test_a_tracker_whose_package_is_missing_is_one_line(tmp_path):
    proc = run_cli(["dist_gan.train", "configs/mnist_dcgan.yaml", f"--run.dir={tmp_path / 'run'}",
                    "--data.source=synthetic", "--data.format=memory", "--run.trackers=[tensorboard, aim]"],
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "run.trackers names aim, whose package is not installed: pip install aim (or drop it from "
        "run.trackers)")
