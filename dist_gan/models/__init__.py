"""Networks by name. Adding one: a class taking (NetConfig, z_dim, resolution, channels, num_classes),
following the conventions in ``models/base.py``, and one line below."""

from __future__ import annotations

import torch.nn as nn

from dist_gan.config import Config, NetConfig, lookup
from dist_gan.models.base import PackedDiscriminator, accept_fp32_io, freeze_blocks
from dist_gan.models.dcgan import DCGANDiscriminator, DCGANEncoder, DCGANGenerator
from dist_gan.models.mlp import MLPDiscriminator, MLPGenerator
from dist_gan.models.points import PointsDiscriminator, PointsGenerator
from dist_gan.models.r3gan import R3GANDiscriminator, R3GANGenerator
from dist_gan.models.resnet import ResNetDiscriminator, ResNetGenerator
from dist_gan.models.rnn import RNNDiscriminator, RNNGenerator
from dist_gan.models.stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator

GENERATORS: dict[str, type[nn.Module]] = {"dcgan": DCGANGenerator, "mlp": MLPGenerator,
                                          "rnn": RNNGenerator, "resnet": ResNetGenerator,
                                          "stylegan2": StyleGAN2Generator, "r3gan": R3GANGenerator,
                                          "points": PointsGenerator}
DISCRIMINATORS: dict[str, type[nn.Module]] = {"dcgan": DCGANDiscriminator, "mlp": MLPDiscriminator,
                                              "rnn": RNNDiscriminator, "resnet": ResNetDiscriminator,
                                              "stylegan2": StyleGAN2Discriminator,
                                              "r3gan": R3GANDiscriminator,
                                              "points": PointsDiscriminator}
ENCODERS: dict[str, type[nn.Module]] = {"dcgan": DCGANEncoder}  # model.encoder.arch "none": no encoder


def _build(registry: dict, key: str, net: NetConfig, config: Config) -> nn.Module:
    network = lookup(registry, key, net.arch)(net, config.model.z_dim, config.data.resolution,
                                              config.data.channels * net.pack, config.model.num_classes)
    if net.pack > 1:
        network = PackedDiscriminator(network, net.pack)
    freeze_blocks(network, net.freeze, net.arch)
    return accept_fp32_io(network)


def build_generator(config: Config) -> nn.Module:
    return _build(GENERATORS, "model.generator.arch", config.model.generator, config)


def build_discriminator(config: Config) -> nn.Module:
    return _build(DISCRIMINATORS, "model.discriminator.arch", config.model.discriminator, config)


def build_encoder(config: Config) -> nn.Module | None:
    """The VAE-GAN encoder, or None when ``model.encoder.arch`` is "none"."""
    if config.model.encoder.arch == "none":
        return None
    return _build(ENCODERS, "model.encoder.arch", config.model.encoder, config)
