"""PacGAN's networks for 2-D points (its synthetic experiments, after VEEGAN): G is an MLP of four
hidden layers (``width``, 400 there) with BatchNorm and ReLU and a linear output, D three maxout
layers (``width``, 200 there; 5 pieces) and a linear head. Both take and give samples of shape
(channels, resolution, resolution), the (2, 1, 1) the mixtures hold."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dist_gan.config import NetConfig
from dist_gan.models.base import ConditionalInput, Discriminator, DiscriminatorHead
from dist_gan.models.layers import add_spectral_norm, norm_1d

GENERATOR_DEPTH, DISCRIMINATOR_DEPTH, MAXOUT_PIECES = 4, 3, 5
INIT_STD = 0.02  # PacGAN's weights_init: N(0, 0.02^2), biases 0


def _init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=INIT_STD)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class Maxout(nn.Module):
    """The largest of ``pieces`` linear maps of the input, per output unit (Goodfellow et al. 2013)."""

    def __init__(self, f_in: int, f_out: int, pieces: int = MAXOUT_PIECES):
        super().__init__()
        self.linear, self.pieces = nn.Linear(f_in, f_out * pieces), pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).unflatten(1, (-1, self.pieces)).amax(2)


class PointsGenerator(nn.Module):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int, num_classes: int = 0):
        super().__init__()
        self.z_dim = z_dim
        self.condition = ConditionalInput(z_dim, num_classes)
        self.shape = (channels, resolution, resolution)
        layers: list[nn.Module] = []
        f_in = self.condition.out_dim
        for _ in range(GENERATOR_DEPTH):  # no bias before a norm, as PacGAN's decoder
            layers += [nn.Linear(f_in, cfg.width, bias=cfg.norm == "none"), norm_1d(cfg.norm, cfg.width),
                       nn.ReLU(True)]
            f_in = cfg.width
        layers.append(nn.Linear(f_in, math.prod(self.shape)))  # linear: points are not bounded
        self.body = nn.Sequential(*layers)
        _init(self)
        if cfg.spectral_norm:
            add_spectral_norm(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(self.condition(z, labels)).view(-1, *self.shape)


class PointsDiscriminator(Discriminator):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int, num_classes: int = 0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        f_in = channels * resolution * resolution
        for _ in range(DISCRIMINATOR_DEPTH):
            layers += [Maxout(f_in, cfg.width), norm_1d(cfg.norm, cfg.width)]
            f_in = cfg.width
        self.body = nn.Sequential(*layers)
        self.head = DiscriminatorHead(cfg.width, num_classes, cfg.mbstd)
        _init(self)
        if cfg.spectral_norm:
            add_spectral_norm(self)
