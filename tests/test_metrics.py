"""Quality metrics: the reference classifier, FID/KID/IS behaving as they must, eval in training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dist_gan.metrics
from dist_gan.config import DataConfig
from dist_gan.data.sources import load_mnist_idx
from dist_gan.metrics import Embedder, class_coverage, fid_kid_is, precision_recall, real_embeddings
from dist_gan.metrics.classifier import accuracy, default_classifier_path, load_or_train_classifier

from conftest import FAST, read_metrics, run_cli
from helpers import run_here

pytestmark = pytest.mark.tier("e2e")  # every tier but unit is also slow (conftest)


@pytest.fixture(scope="module")
def embedded(reference_classifier, mnist_dir):
    model, _ = reference_classifier
    embed = Embedder(model)
    data = DataConfig(mnist_dir=str(mnist_dir))
    return embed, real_embeddings(data, "train", embed), real_embeddings(data, "test", embed)


def test_the_shipped_classifier_is_accurate_and_loads_without_data(reference_classifier, mnist_dir):
    model, path = reference_classifier
    images, labels = load_mnist_idx(mnist_dir, "test")
    assert accuracy(model, images, labels) >= 0.99
    assert torch.load(path, weights_only=True)["test_accuracy"] >= 0.99
    assert path == default_classifier_path() and path.parent == Path(dist_gan.metrics.__file__).parent
    modified = path.stat().st_mtime_ns
    again = load_or_train_classifier(None)  # no MNIST needed, nothing trained
    assert path.stat().st_mtime_ns == modified
    x = images[:64].float().div(127.5).sub(1).unsqueeze(1)
    assert torch.equal(again(x), model(x))


def test_train_classifier_learns_saves_and_is_read_back_not_retrained(tmp_path, mnist_dir):
    """The command that made the shipped weights, on 4,000 images for 2 epochs (the reference: all
    60,000 for 3): it learns, writes where it is told, and load_or_train reads that file back."""
    from dist_gan.metrics.__main__ import train_classifier_command

    out = tmp_path / "classifier.pt"
    train_classifier_command(str(mnist_dir), out=str(out), epochs=2, limit=4000)
    saved = torch.load(out, weights_only=True)["test_accuracy"]
    assert 0.85 <= saved < 1.0, saved
    modified = out.stat().st_mtime_ns
    model = load_or_train_classifier(None, out)
    assert out.stat().st_mtime_ns == modified
    images, labels = load_mnist_idx(mnist_dir, "test")
    assert accuracy(model, images, labels) == saved
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_or_train_classifier(None, tmp_path / "absent.pt")


def test_fid_kid_is_behave(embedded, mnist_dir):
    embed, (train_f, _), (test_f, test_l) = embedded
    real = fid_kid_is(train_f, test_f[:5000], test_l[:5000])
    noise_f, noise_l = embed(torch.rand(5000, 1, 28, 28) * 2 - 1)
    noise = fid_kid_is(train_f, noise_f, noise_l)
    blank_f, blank_l = embed(torch.full((5000, 1, 28, 28), -1.0))
    blank = fid_kid_is(train_f, blank_f, blank_l)
    images, labels = load_mnist_idx(mnist_dir, "test")
    one_digit = images[labels == 3][:1].float().div(127.5).sub(1).unsqueeze(1).repeat(5000, 1, 1, 1)
    one_f, one_l = embed(one_digit)
    single = fid_kid_is(train_f, one_f, one_l)

    # Features are unnormalised 128-d activations (norm ~50), so figures are compared, not absolute:
    # measured here, real test vs train ~14 FID against ~2,170 for noise or a blank image.
    assert real["fid"] < 0.02 * noise["fid"] and real["fid"] < 0.02 * blank["fid"], (real, noise, blank)
    assert real["kid"] < 0.05 * noise["kid"] and real["kid"] < 0.05 * blank["kid"]
    assert single["fid"] > 10 * real["fid"] and single["kid"] > 10 * real["kid"]
    assert real["is"] > 9.0, real  # near 10: confident, all classes equally
    assert single["is"] < 1.1, single  # one repeated digit: 1
    assert noise["is"] < 2.0 and blank["is"] < 2.0


def test_coverage_and_precision_recall(embedded):
    _, (train_f, _), (test_f, test_l) = embedded
    real = class_coverage(test_l)
    assert real["classes_covered"] == 10 and real["class_kl_uniform"] < 0.01
    only_ones = class_coverage(torch.nn.functional.one_hot(torch.ones(100, dtype=torch.long), 10).float())
    assert only_ones["classes_covered"] == 1 and only_ones["class_kl_uniform"] == pytest.approx(2.302585, abs=1e-5)
    pr = precision_recall(train_f[:3000], test_f[:3000])
    assert pr["precision"] > 0.6 and pr["recall"] > 0.6
    half = test_f[:3000][test_l[:3000].argmax(1) < 5]  # only digits 0-4: precise but half the recall
    collapsed = precision_recall(train_f[:3000], half)
    assert collapsed["precision"] > 0.6 and collapsed["recall"] < pr["recall"] - 0.2


def test_eval_during_training_and_evaluate_command(tmp_path, mnist_dir, mnist_shards, reference_classifier, capsys):
    run = tmp_path / "run"
    run_cli(["dist_gan.train", "configs/mnist_dcgan.yaml", f"--run.dir={run}", "--train.max_steps=20",
             f"--data.mnist_dir={mnist_dir}", f"--data.shards={mnist_shards}", "--eval.every=10",
             "--eval.n_samples=300", *FAST])
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("fid", "kid", "is", "precision", "recall", "classes_covered", "class_kl_uniform"):
        assert [e.step for e in events.Scalars(f"eval/{tag}")] == [10, 20], tag
    evals = [r for r in read_metrics(run) if "fid" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(r["fid"] > 0 and 1 <= r["is"] <= 10 for r in evals)

    out = tmp_path / "eval.json"
    proc = run_cli(["dist_gan.evaluate", str(run), "--n=500", f"--json_out={out}"])
    assert "real test (floor)" in proc.stdout and "fid" in proc.stdout
    results = json.loads(out.read_text())
    assert results["generated"]["fid"] > 3 * results["real test (floor)"]["fid"]  # 20 steps is not MNIST
    assert results["real test (floor)"]["classes_covered"] == 10

    run_here(["dist_gan.sample", str(run), "--n=6", f"--out_dir={tmp_path / 'each'}"], capsys)
    assert len(list((tmp_path / "each").glob("*.png"))) == 6
    run_here(["dist_gan.sample", str(run), "--n=8", "--interpolate", f"--out={tmp_path / 'walk.png'}"], capsys)
    from PIL import Image

    with Image.open(tmp_path / "walk.png") as walk:  # 8 steps in one row of 28 px images, 2 px padding
        assert walk.size == (8 * 30 + 2, 32)
        strip = np.asarray(walk.convert("L"), dtype=np.float64)
    tiles = [strip[2:30, 2 + 30 * i:30 + 30 * i] for i in range(8)]
    assert all(np.abs(a - b).mean() > 0 for a, b in zip(tiles, tiles[1:]))  # the walk moves


@pytest.mark.parametrize("net", ["torchvision", "helpers:tiny_feature_net"])
def test_other_feature_networks_by_name(tmp_path, net):
    from torchvision.models import resnet18

    from dist_gan.config import load_config
    from dist_gan.metrics import build_feature_net

    weights = tmp_path / "resnet18.pt"
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), weights)  # local weights: nothing is downloaded
    config = load_config(None, {"eval.feature_net": net, "eval.feature_weights": str(weights)})
    embed = Embedder(build_feature_net(config), batch_size=4)
    feats, logits = embed(torch.rand(6, 1, 28, 28) * 2 - 1)
    assert feats.shape == ((6, 512) if net == "torchvision" else (6, 4))
    assert logits.shape == ((6, 1000) if net == "torchvision" else (6, 3))
    figures = fid_kid_is(feats, feats + 0.1 * torch.randn_like(feats), logits, kid_subset=6)
    assert figures["fid"] >= 0 and figures["is"] > 0.999  # IS >= 1 up to rounding


def test_feature_network_errors_name_the_key(tmp_path):
    from dist_gan.config import ConfigError, load_config
    from dist_gan.metrics import build_feature_net

    with pytest.raises(ConfigError, match="eval.feature_net = 'inceptoin'"):
        load_config(None, {"eval.feature_net": "inceptoin"})
    with pytest.raises(ConfigError, match="needs eval.feature_weights"):
        build_feature_net(load_config(None, {"eval.feature_net": "torchvision"}))
    with pytest.raises(ConfigError, match="cannot import 'nope' from 'test_metrics'"):
        build_feature_net(load_config(None, {"eval.feature_net": "test_metrics:nope"}))
