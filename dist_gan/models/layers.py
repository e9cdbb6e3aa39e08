"""Building blocks shared by the networks: normalisation by name, spectral norm, DCGAN init.
(Running with half-precision weights is the backend's: ``backend.accept_fp32_io``.)"""

from __future__ import annotations

import torch.nn as nn
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
