"""DCGAN-style convolutional generator and discriminator for square images of 2^k x {4..7} pixels.

28x28 (MNIST) starts from 7x7, 32x32 and 64x64 from 4x4. Each stride-2 stage doubles (G) or halves
(D) the resolution; channels follow Radford et al.: ``width`` at the full-resolution stage, doubling
per stage towards 4x4/7x7, capped at 8 x ``width``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn

from dist_gan.config import NetConfig
from dist_gan.models.base import ConditionalInput, Discriminator, DiscriminatorHead, stage_plan
from dist_gan.models.layers import add_spectral_norm, dcgan_init, norm_2d


class DCGANGenerator(nn.Module):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        self.z_dim = z_dim
        self.condition = ConditionalInput(z_dim, num_classes)
        self.base, widths = stage_plan(resolution, cfg.width, "dcgan")
        self.project = nn.Linear(self.condition.out_dim, widths[0] * self.base * self.base)
        layers: list[nn.Module] = [nn.Unflatten(1, (widths[0], self.base, self.base)),
                                   norm_2d(cfg.norm, widths[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=cfg.norm == "none"),
                       norm_2d(cfg.norm, c_out), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        dcgan_init(self)
        if cfg.spectral_norm:
            add_spectral_norm(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(self.project(self.condition(z, labels)))


def conv_features(cfg: NetConfig, resolution: int, channels: int) -> tuple[nn.Sequential, int]:
    """DCGAN's strided-conv stack, images -> flat features, and the feature count."""
    base, widths = stage_plan(resolution, cfg.width, "dcgan")
    widths = widths[::-1]  # largest map first
    layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=cfg.norm == "none"),
                   norm_2d(cfg.norm, c_out), nn.LeakyReLU(0.2, True)]
    return nn.Sequential(*layers, nn.Flatten()), widths[-1] * base * base


class DCGANDiscriminator(Discriminator):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        self.body, features = conv_features(cfg, resolution, channels)
        self.head = DiscriminatorHead(features, num_classes, cfg.mbstd)
        dcgan_init(self)
        if cfg.spectral_norm:
            add_spectral_norm(self)

    def blocks(self) -> list[nn.Module]:
        """Each strided conv with its norm and activation, from the input."""
        layers = list(cast(nn.Sequential, self.body))[:-1]  # the Flatten last
        return [nn.Sequential(*layers[:2]), *(nn.Sequential(*layers[i:i + 3]) for i in range(2, len(layers), 3))]


class DCGANEncoder(nn.Module):
    """VAE-GAN's encoder: the discriminator's conv stack, then the posterior's mean and log-variance."""

    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        self.body, features = conv_features(cfg, resolution, channels)
        self.posterior = nn.Linear(features, 2 * z_dim)
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.posterior(self.body(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)
