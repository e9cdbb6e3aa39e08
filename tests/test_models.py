import pytest
import torch

from dist_gan.config import Config, NetConfig, load_config
from dist_gan.models import build_discriminator, build_generator
from dist_gan.models.dcgan import stage_plan


def make(arch, resolution, channels, norm_g="batch", norm_d="none", sn=False):
    config = Config()
    config.data.resolution, config.data.channels = resolution, channels
    config.model.z_dim = 32
    config.model.generator = NetConfig(arch=arch, width=8, norm=norm_g, spectral_norm=sn)
    config.model.discriminator = NetConfig(arch=arch, width=8, norm=norm_d, spectral_norm=sn)
    return build_generator(config), build_discriminator(config)


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
@pytest.mark.parametrize("resolution,channels", [(28, 1), (32, 3), (64, 3)])
def test_shapes(arch, resolution, channels):
    G, D = make(arch, resolution, channels)
    images = G(torch.randn(5, 32))
    assert images.shape == (5, channels, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert D(images).shape == (5,)


def test_stage_plan():
    assert stage_plan(28, 64) == (7, [128, 64])
    assert stage_plan(64, 64) == (4, [512, 256, 128, 64])
    with pytest.raises(ValueError, match="resolution 30"):
        stage_plan(30, 64)


@pytest.mark.parametrize("norm", ["layer", "instance", "none"])
def test_norm_choice_keeps_samples_independent(norm):
    """A critic for a per-sample gradient penalty must not mix samples in a batch."""
    _, D = make("dcgan", 28, 1, norm_d=norm)
    x = torch.randn(4, 1, 28, 28)
    alone = D(x[:1])
    assert torch.allclose(D(x)[:1], alone, atol=1e-5)


def test_spectral_norm_bounds_each_layer():
    _, D = make("dcgan", 28, 1, sn=True)
    D.train()
    for _ in range(30):  # power iterations converge during forward passes
        D(torch.randn(2, 1, 28, 28))
    head = D.head
    assert hasattr(head, "parametrizations")
    sigma = torch.linalg.matrix_norm(head.weight.detach(), ord=2)
    assert sigma.item() == pytest.approx(1.0, rel=0.05)


def test_instance_norm_refused_for_mlp():
    with pytest.raises(ValueError, match="not available for fully connected"):
        make("mlp", 28, 1, norm_g="instance")


def test_shipped_config_networks_build():
    config = load_config("configs/mnist_dcgan.yaml")
    G, D = build_generator(config), build_discriminator(config)
    assert D(G(torch.randn(2, config.model.z_dim))).shape == (2,)
