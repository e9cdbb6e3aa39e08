"""Networks by name. Adding one: a class taking (NetConfig, z_dim, resolution, channels), one line below."""

from __future__ import annotations

import torch.nn as nn

from dist_gan.config import Config
from dist_gan.models.dcgan import DCGANDiscriminator, DCGANGenerator
from dist_gan.models.mlp import MLPDiscriminator, MLPGenerator

GENERATORS: dict[str, type[nn.Module]] = {"dcgan": DCGANGenerator, "mlp": MLPGenerator}
DISCRIMINATORS: dict[str, type[nn.Module]] = {"dcgan": DCGANDiscriminator, "mlp": MLPDiscriminator}


def build_generator(config: Config) -> nn.Module:
    net = config.model.generator
    return GENERATORS[net.arch](net, config.model.z_dim, config.data.resolution, config.data.channels)


def build_discriminator(config: Config) -> nn.Module:
    net = config.model.discriminator
    return DISCRIMINATORS[net.arch](net, config.model.z_dim, config.data.resolution,
                                    config.data.channels)
