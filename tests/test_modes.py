"""Mode coverage: StackedMNIST and the 2-D mixtures as data sources, their mode assignment and
figures, PacGAN's packing, and the scatter plot of points."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dist_gan.config import Config, ConfigError, DataConfig, load_config
from dist_gan.core.imagegrid import picture
from dist_gan.data import DataError, build_batch_stream, prepare_shards
from dist_gan.data.mixtures import MIXTURE_SIZE, MIXTURES, QUALITY_SIGMAS
from dist_gan.data.sources import DATA_SOURCES, STACKED_MNIST_MODES, mnist_source, to_model_range
from dist_gan.metrics.classifier import load_or_train_classifier
from dist_gan.metrics.evaluator import figures
from dist_gan.metrics.modes import PointFeatures, StackedMnistFeatures, coverage_figures
from dist_gan.metrics.quality import Embedder, Reference
from dist_gan.models import build_discriminator, build_generator

pytestmark = pytest.mark.tier("unit")


def stacked(mnist_dir, **kwargs) -> DataConfig:
    return DataConfig(source="stacked_mnist", mnist_dir=str(mnist_dir), format="memory", channels=3,
                      **kwargs)


def test_coverage_figures_count_modes_kl_and_hits():
    uniform = torch.arange(1000).repeat(26)
    assert coverage_figures(uniform, 1000) == {"modes": 1000, "modes_kl": pytest.approx(0.0, abs=1e-12),
                                              "mode_hit_share": 1.0}
    one = coverage_figures(torch.zeros(500, dtype=torch.long), 1000)
    assert one["modes"] == 1 and one["modes_kl"] == pytest.approx(math.log(1000))
    half = coverage_figures(torch.tensor([0, 1, -1, -1]), 2)  # misses are left out of the histogram
    assert half == {"modes": 2, "modes_kl": pytest.approx(0.0), "mode_hit_share": 0.5}
    assert coverage_figures(torch.full((3,), -1), 8)["modes_kl"] == math.inf


def test_stacked_mnist_is_three_seeded_digits_labelled_by_their_triple(mnist_dir):
    cfg = stacked(mnist_dir, limit=300)
    first, again = DATA_SOURCES["stacked_mnist"](cfg), DATA_SOURCES["stacked_mnist"](cfg)
    assert first.images.shape == (300, 3, 28, 28) and first.images.dtype == torch.uint8
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert len(first.class_names) == STACKED_MNIST_MODES
    digits = mnist_source(DataConfig(mnist_dir=str(mnist_dir)))
    by_image = {bytes(digits.images[i, 0].numpy()): int(digits.labels[i]) for i in range(len(digits))}
    for image, label in zip(first.images[:20], first.labels[:20]):
        triple = [by_image[bytes(channel.numpy())] for channel in image]
        assert int(label) == 100 * triple[0] + 10 * triple[1] + triple[2]
    test = DATA_SOURCES["stacked_mnist"](cfg, "test")
    assert len(test) == 26_000 and not torch.equal(test.images[:300], first.images)
    padded = DATA_SOURCES["stacked_mnist"](stacked(mnist_dir, limit=300, resolution=32))
    assert padded.images.shape[-1] == 32 and padded.images[..., :2, :].sum() == 0
    assert torch.equal(padded.images[..., 2:30, 2:30], first.images)
    with pytest.raises(DataError, match="data.channels=3"):
        DATA_SOURCES["stacked_mnist"](DataConfig(source="stacked_mnist", mnist_dir=str(mnist_dir), limit=10))


def test_stacked_mnist_writes_shards_of_its_fixed_set(mnist_dir, tmp_path):
    cfg = stacked(mnist_dir, limit=120, shard_size=50)
    prepare_shards(cfg, tmp_path / "shards", progress=False)
    assert len(list((tmp_path / "shards").glob("train-*.tar"))) == 3
    shards = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    read = dataclasses.replace(cfg, format="shards", shards=shards, workers=0, batch_size=40)
    stream = build_batch_stream(read, seed=0, rank=0, world_size=1, device="cpu")
    images, labels = stream.next_batch()
    stream.close()
    assert images.shape == (40, 3, 28, 28) and labels.max() < 1000


def test_the_stacked_classifier_reads_real_triples(mnist_dir):
    real = DATA_SOURCES["stacked_mnist"](stacked(mnist_dir), "test")
    network = StackedMnistFeatures(load_or_train_classifier(str(mnist_dir)))
    feats, logits = Embedder(network)(to_model_range(real.images[:3000]))
    assert feats.shape == (3000, 384) and logits.shape == (3000, 1000)
    accuracy = (network.mode_ids(feats, logits) == real.labels[:3000]).float().mean()
    assert accuracy > 0.95  # three digits right at ~99% each
    padded = DATA_SOURCES["stacked_mnist"](stacked(mnist_dir, resolution=32), "test")
    _, padded_logits = Embedder(network)(to_model_range(padded.images[:200]))
    assert torch.equal(padded_logits.argmax(1), logits[:200].argmax(1))  # the padding is cropped off


@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_mixture_points_and_their_modes(name):
    mixture = MIXTURES[name]
    cfg = DataConfig(source=name, format="memory", resolution=1, channels=2)
    points = DATA_SOURCES[name](cfg)
    assert len(points) == MIXTURE_SIZE and points.images.shape[1:] == (2, 1, 1)
    assert points.images.dtype == torch.float32 and torch.equal(to_model_range(points.images), points.images)
    flat = points.images.flatten(1)
    assert torch.equal(DATA_SOURCES[name](cfg).images, points.images)  # seeded
    ids = mixture.nearest(flat)
    # P(|N(0, s^2 I_2)| < 3 s) = 1 - exp(-9 / 2) = 0.989: the real set's own share of good samples
    share = float((ids >= 0).float().mean())
    assert share == pytest.approx(1 - math.exp(-QUALITY_SIGMAS**2 / 2), abs=0.003)
    assert torch.equal(ids[ids >= 0], points.labels[ids >= 0])
    reference, judge = Reference.from_features(flat[2500:12500]), PointFeatures(mixture)
    real = figures(reference, judge, *Embedder(judge)(points.images[:2500]), 0)
    assert real["modes"] == mixture.modes and real["modes_kl"] < 0.02 and real["fid"] < 0.05
    collapsed = torch.zeros(2500, 2, 1, 1) + mixture.means[0].view(1, 2, 1, 1)
    bad = figures(reference, judge, *Embedder(judge)(collapsed), 0)
    assert bad["modes"] == 1 and bad["modes_kl"] == pytest.approx(math.log(mixture.modes))
    assert bad["mode_hit_share"] == 1.0 and bad["fid"] > 1


def test_mixture_settings_are_checked_at_load(tmp_path):
    good = {"data.source": "grid25", "data.format": "memory", "data.resolution": 1, "data.channels": 2}
    load_config(None, good)
    for key, value in (("data.channels", 3), ("data.resolution", 8), ("data.format", "shards")):
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            load_config(None, {**good, key: value})
    with pytest.raises(ConfigError, match="channels"):
        load_config(None, {"data.channels": 2})  # images are grey or RGB
    with pytest.raises(DataError, match="data.format=memory"):
        prepare_shards(DataConfig(source="ring8", format="memory", resolution=1, channels=2), tmp_path)


def test_pack_is_checked_at_load():
    with pytest.raises(ConfigError, match="multiple of model.discriminator.pack=3"):
        load_config(None, {"model.discriminator.pack": 3, "data.batch_size": 64})
    with pytest.raises(ConfigError, match="conditional"):
        load_config(None, {"model.discriminator.pack": 2, "model.num_classes": 10})
    with pytest.raises(ConfigError, match="generator.pack"):
        load_config(None, {"model.generator.pack": 2})
    with pytest.raises(ConfigError, match="pack"):
        load_config(None, {"model.discriminator.pack": 0})


@pytest.mark.parametrize("arch", ["points", "dcgan", "r3gan"])
def test_a_packed_discriminator_judges_groups(arch):
    overrides = {"model.discriminator.arch": arch, "model.discriminator.pack": 2, "model.discriminator.width": 8,
                 "model.discriminator.widths": [8, 8, 8], "model.discriminator.blocks": [1, 1, 1]}
    if arch == "points":
        overrides.update({"data.source": "grid25", "data.format": "memory", "data.resolution": 1,
                          "data.channels": 2})
    config = load_config(None, overrides)
    torch.manual_seed(0)
    D = build_discriminator(config)
    x = torch.randn(6, config.data.channels, config.data.resolution, config.data.resolution)
    logits = D(x)
    assert logits.shape == (3,)
    joined = x.reshape(3, 2 * config.data.channels, config.data.resolution, config.data.resolution)
    assert torch.allclose(D.inner(joined), logits)
    with pytest.raises(ValueError, match="groups of 2"):
        D(x[:5])


def test_points_networks_shape_and_init():
    config = load_config("configs/grid25_gan.yaml")
    G, D = build_generator(config), build_discriminator(config)
    z = torch.randn(100, config.model.z_dim)
    points = G(z)
    assert points.shape == (100, 2, 1, 1) and D(points).shape == (100,)
    first = next(m for m in G.modules() if isinstance(m, torch.nn.Linear))
    assert first.bias is None and float(first.weight.std()) == pytest.approx(0.02, rel=0.2)  # PacGAN's init
    assert sum(p.numel() for p in G.parameters()) > 400 * 400 * 3  # four 400-unit layers


def test_points_are_drawn_as_a_scatter_plot():
    points = torch.tensor([[0.0, 0.0], [5.9, 5.9], [-5.9, -5.9], [9.0, 0.0]]).view(4, 2, 1, 1)
    image = picture(points, extent=6.0)
    assert image.shape == (3, 512, 512)
    dark = image.mean(0) < 0.5
    assert dark[255:257, 255:257].any()  # the origin
    assert dark[:12, 500:].any() and dark[500:, :12].any()  # top right, bottom left (y grows upwards)
    assert dark[254:258, 509:].any()  # a point outside the square is drawn on its border
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    assert picture(images).shape == (3, 8 + 4, 4 * 10 + 2)  # images: still a grid, one row of four


def test_auto_feature_net_follows_the_protocol():
    cfg = Config()
    assert cfg.eval.resolved_feature_net(DataConfig(source="stacked_mnist")) == "stacked_mnist_classifier"
    assert cfg.eval.resolved_feature_net(DataConfig(source="ring8")) == "points"
    assert cfg.eval.resolved_feature_net(DataConfig(source="mnist")) == "mnist_classifier"


def test_lazy_penalties_with_rpgan_are_warned_about():
    lazy = load_config(None, {"loss.name": "rpgan", "loss.r1_gamma": 0.1, "loss.r1_every": 4})
    assert any("appendix E" in w and "loss.r1_every=4" in w for w in lazy.warnings())
    assert load_config(None, {"loss.name": "rpgan", "loss.r1_gamma": 0.1}).warnings() == []
    for name in ("mnist_r3gan", "cifar10_r3gan", "folder256_r3gan"):
        assert load_config(f"configs/{name}.yaml").warnings() == [], name
