"""The seed's fully connected GAN (the classic Keras MNIST GAN), fixed: for small images only."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dist_gan.config import NetConfig
from dist_gan.models.base import ConditionalInput, Discriminator, DiscriminatorHead
from dist_gan.models.layers import add_spectral_norm, norm_1d


class MLPGenerator(nn.Module):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        self.z_dim = z_dim
        self.condition = ConditionalInput(z_dim, num_classes)
        self.shape = (channels, resolution, resolution)
        hidden = [cfg.width * 4, cfg.width * 8, cfg.width * 16]  # 256, 512, 1024 at width 64
        layers: list[nn.Module] = []
        for f_in, f_out in zip([self.condition.out_dim] + hidden, hidden):
            layers += [nn.Linear(f_in, f_out), norm_1d(cfg.norm, f_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Linear(hidden[-1], math.prod(self.shape)), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        if cfg.spectral_norm:
            add_spectral_norm(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(self.condition(z, labels)).view(-1, *self.shape)  # -1: a dynamic batch in ONNX


class MLPDiscriminator(Discriminator):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        hidden = [cfg.width * 8, cfg.width * 4]  # 512, 256 at width 64
        layers: list[nn.Module] = [nn.Flatten()]
        for f_in, f_out in zip([channels * resolution * resolution] + hidden, hidden):
            layers += [nn.Linear(f_in, f_out), norm_1d(cfg.norm, f_out), nn.LeakyReLU(0.2, True)]
        self.body = nn.Sequential(*layers)
        self.head = DiscriminatorHead(hidden[-1], num_classes, cfg.mbstd)
        if cfg.spectral_norm:
            add_spectral_norm(self)
