"""Building blocks shared by the networks: normalisation by name, spectral norm, initialisations,
self-attention.
(Running with half-precision weights: ``base.accept_fp32_io``.)"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from dist_gan.config import ConfigError


def norm_2d(kind: str, channels: int) -> nn.Module:
    """A normalisation layer for (N, C, H, W) features, chosen by name."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)  # per-sample, per-channel; affine like the others
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"unknown norm {kind!r}; expected batch, layer, instance or none")


def norm_1d(kind: str, features: int) -> nn.Module:
    """A normalisation layer for (N, F) features; instance norm has no meaning there."""
    if kind == "batch":
        return nn.BatchNorm1d(features)
    if kind == "layer":
        return nn.LayerNorm(features)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm {kind!r} is not available for fully connected layers; "
                     "use batch, layer or none")


def add_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectrally normalise the weight of every conv, linear and embedding layer (the projection
    discriminator's class embedding, as Miyato & Koyama) in ``module``, in place."""
    for child in list(module.modules()):
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            spectral_norm(child)
    return module


def dcgan_init(module: nn.Module) -> None:
    """Radford et al.'s initialisation: N(0, 0.02) weights, N(1, 0.02) norm scales, zero biases."""
    for child in module.modules():
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(child.weight, 0.0, 0.02)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)):
            if child.weight is not None:
                nn.init.normal_(child.weight, 1.0, 0.02)
                nn.init.zeros_(child.bias)


def init_weights(module: nn.Module, kind: str) -> None:
    """Conv and linear weights by name ("orthogonal": BigGAN's; "normal": N(0, 0.02); "xavier":
    SNGAN's), zero biases; embeddings N(0, 1); norm layers keep their identity start."""
    for child in module.modules():
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if kind == "orthogonal":
                nn.init.orthogonal_(child.weight)
            elif kind == "normal":
                nn.init.normal_(child.weight, 0.0, 0.02)
            elif kind == "xavier":
                nn.init.xavier_uniform_(child.weight)
            else:
                raise ConfigError(f"unknown init {kind!r}; expected orthogonal, normal or xavier")
            if child.bias is not None:
                nn.init.zeros_(child.bias)


class SelfAttention(nn.Module):
    """SAGAN's self-attention (Zhang et al. 2019) as BigGAN uses it: queries from C/8 channels, keys
    and values from 2x2-max-pooled maps (C/8 and C/2 channels), output added with a learned gain that
    starts at 0, so the block begins as the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, max(channels // 8, 1), 1, bias=False)
        self.key = nn.Conv2d(channels, max(channels // 8, 1), 1, bias=False)
        self.value = nn.Conv2d(channels, max(channels // 2, 1), 1, bias=False)
        self.out = nn.Conv2d(max(channels // 2, 1), channels, 1, bias=False)
        self.gain = nn.Parameter(torch.zeros(1))  # not 0-d: DeepSpeed cannot broadcast a 0-d bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query(x).flatten(2)                        # (N, C/8, HW)
        k = F.max_pool2d(self.key(x), 2).flatten(2)         # (N, C/8, HW/4)
        v = F.max_pool2d(self.value(x), 2).flatten(2)       # (N, C/2, HW/4)
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (N, HW, HW/4)
        o = (v @ attention.transpose(1, 2)).view(n, -1, h, w)
        return x + self.gain * self.out(o)
