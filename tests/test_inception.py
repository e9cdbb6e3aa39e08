"""Standard FID (issue 17): the FID Inception-v3 feature path, the Fréchet distance against scipy,
reference statistics written by `dist-gan evaluate --reference` and read back, and the errors.

The machines running these tests cannot download the real Inception weights, so the network is
built with random weights (torchvision's initialisation, saved as a local weights file, exactly as a
user without internet supplies the real file): the pipeline is tested, not the figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dist_gan.config import ConfigError, load_config
from dist_gan.metrics import (
    Embedder,
    InceptionFeatures,
    Reference,
    build_feature_net,
    feature_statistics,
    fid_kid_is,
    frechet_distance,
    quality,
)

from conftest import run_cli

pytestmark = pytest.mark.tier("unit")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """Random weights in the layout of the FID Inception file (torchvision's blocks, a 1008-way fc)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=False, init_weights=True).state_dict()
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def inception(inception_weights):
    return InceptionFeatures(str(inception_weights))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 256])
def test_inception_features_of_grey_and_rgb_images_at_any_size(inception, channels, size):
    images = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    features, logits = Embedder(inception, batch_size=2)(images)
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    assert torch.isfinite(features).all() and features.std() > 0
    if channels == 1:  # grey is repeated to RGB: the same as giving the RGB image
        rgb, _ = Embedder(inception)(images.expand(-1, 3, -1, -1))
        assert torch.allclose(features, rgb, atol=1e-5)


def test_inception_preprocessing_quantises_and_resizes_antialiased(inception):
    """What reaches the first convolution: 299 x 299, the 8-bit levels of the image, (x - 128) / 128."""
    seen = []
    hook = inception.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        inception.embed(torch.full((1, 3, 32, 32), 0.5))  # 191.25 in [0, 255]: quantised to 191
    finally:
        hook.remove()
    assert seen[0].shape == (1, 3, 299, 299)
    assert torch.allclose(seen[0], torch.full_like(seen[0], (191 - 128) / 128), atol=1e-5)


def test_frechet_distance_equals_the_closed_form_with_scipy_sqrtm():
    import scipy.linalg

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(600, 32, generator=generator)
    b = torch.randn(500, 32, generator=generator) @ (torch.eye(32) + 0.3 * torch.randn(32, 32, generator=generator)) + 0.5
    mine = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    A, B = a.double().numpy(), b.double().numpy()
    s1, s2 = np.cov(A, rowvar=False), np.cov(B, rowvar=False)
    closed = ((A.mean(0) - B.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert mine == pytest.approx(closed, rel=1e-9)
    assert frechet_distance(*feature_statistics(a), *feature_statistics(a)) == pytest.approx(0, abs=1e-8)
    # the figures' FID is this arithmetic, on the features given
    assert fid_kid_is(a, b, torch.randn(500, 10), kid_subset=100)["fid"] == pytest.approx(closed, rel=1e-9)


def test_reference_statistics_written_and_read_back_give_the_same_figures(tmp_path):
    generator = torch.Generator().manual_seed(1)
    real, fake = torch.randn(3000, 16, generator=generator), torch.randn(800, 16, generator=generator) + 0.2
    logits = torch.randn(800, 10, generator=generator)
    in_place = quality(real, fake, logits)
    Reference.from_features(real, {"feature_net": "test"}).save(tmp_path / "stats.npz")
    loaded = Reference.load(tmp_path / "stats.npz")
    assert loaded.count == 3000 and loaded.meta == {"feature_net": "test"}
    with np.load(tmp_path / "stats.npz") as raw:  # pytorch-fid's names, readable by other tools
        assert raw["mu"].shape == (16,) and raw["sigma"].shape == (16, 16)
    from_file = quality(loaded, fake, logits)
    assert from_file["fid"] == pytest.approx(in_place["fid"], rel=1e-12)
    for key in ("kid", "precision", "recall", "is"):
        assert from_file[key] == pytest.approx(in_place[key], rel=1e-6, abs=1e-9), key
    kept = Reference.from_features(real, keep=1000)  # a subset for KID / PR; FID from all 3000
    assert len(kept.features) == 1000 and torch.equal(kept.mean, loaded.mean)


def test_missing_or_unreachable_weights_say_how_to_supply_them(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"eval.feature_weights=.*nope.pth: no such file.*download https://"):
        build_feature_net(load_config(None, {"eval.feature_net": "inception",
                                             "eval.feature_weights": str(tmp_path / "nope.pth")}))
    # no weights given and no network: a real download attempt through a proxy that refuses it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(ConfigError, match=r"download failed.*set eval.feature_weights=/path/to/that/file"):
        build_feature_net(load_config(None, {"data.source": "cifar10"}))  # auto: inception for CIFAR


def test_auto_picks_the_classifier_for_mnist_and_inception_otherwise():
    assert load_config(None, {}).eval.resolved_feature_net(load_config(None, {}).data) == "mnist_classifier"
    config = load_config(None, {"data.source": "folder", "data.channels": 3})
    assert config.eval.resolved_feature_net(config.data) == "inception"


@pytest.mark.tier("e2e")
@pytest.mark.slow
def test_evaluate_reference_then_train_against_it(tmp_path, inception_weights):
    """`dist-gan evaluate --reference FOLDER --out stats.npz` with the Inception path, then a run
    that evaluates against those statistics; statistics of another feature network are refused."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    stats = tmp_path / "stats.npz"
    run_cli(["dist_gan", "evaluate", f"--reference={folder}", f"--out={stats}", "--resolution=32",
             f"--feature_weights={inception_weights}", "--batch_size=8"])
    reference = Reference.load(stats)
    assert reference.count == 24 and reference.meta["feature_net"] == "inception"
    assert reference.meta["resolution"] == 32 and reference.mean.shape == (2048,)

    run = tmp_path / "run"
    run_cli(["dist_gan.train", "configs/dcgan64_rgb.yaml", f"--run.dir={run}", "--data.source=synthetic",
             "--data.format=memory", "--data.resolution=32", "--data.batch_size=8",
             "--model.generator.width=4", "--model.discriminator.width=4", "--model.z_dim=16",
             "--train.max_steps=2", "--run.log_every=1", "--run.sample_every=100", "--eval.every=2",
             "--eval.n_samples=10", "--eval.batch_size=5", "--eval.feature_net=inception",
             f"--eval.feature_weights={inception_weights}", f"--eval.reference_stats={stats}"])
    from conftest import read_metrics

    evals = [r for r in read_metrics(run) if "fid" in r]
    assert evals and np.isfinite(evals[-1]["fid"]) and "kid" in evals[-1]
    assert not any(k.startswith("class_share") for k in evals[-1])  # ImageNet classes: no histogram

    proc = run_cli(["dist_gan.train", "configs/dcgan64_rgb.yaml", f"--run.dir={tmp_path / 'other'}",
                    "--data.source=synthetic", "--data.format=memory", "--data.resolution=32",
                    "--train.max_steps=1", "--eval.every=1", "--eval.feature_net=helpers:tiny_feature_net",
                    f"--eval.reference_stats={stats}"], check=False, env={"PYTHONPATH": "tests"})
    assert proc.returncode != 0 and f"eval.reference_stats={stats} was computed with feature network inception" \
        in proc.stderr
