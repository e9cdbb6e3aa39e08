"""Feature networks by name (``eval.feature_net``) for FID/KID/IS and class coverage.

A feature network is an ``nn.Module`` with ``embed(images in [-1, 1], N x C x H x W) -> (features
N x d, logits N x classes)``. Built in: ``mnist_classifier`` (trained on first use, cached) and
``torchvision`` (``eval.feature_arch``, e.g. resnet18, with a local ``eval.feature_weights`` file:
nothing is downloaded). Your own: ``eval.feature_net: my_package.my_module:build`` names a function
``build(config) -> module``.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import Config, ConfigError
from dist_gan.metrics.classifier import load_or_train_classifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionFeatures(nn.Module):
    """A torchvision classifier with a final ``fc`` layer (ResNets, Inception v3, GoogLeNet):
    features before ``fc``, logits after it. Inputs are resized and ImageNet-normalised."""

    def __init__(self, arch: str, weights_path: str, size: int = 224):
        super().__init__()
        from torchvision.models import get_model

        model = get_model(arch, weights=None)
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        if not isinstance(getattr(model, "fc", None), nn.Linear):
            raise ConfigError(f"eval.feature_arch={arch}: torchvision model has no final `fc` layer")
        self.head, model.fc = model.fc, nn.Identity()
        self.body, self.size = model.eval(), size
        self.num_features = self.head.in_features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        features = self.body((x - self.mean) / self.std)
        return features, self.head(features)


def _mnist_classifier(config: Config) -> nn.Module:
    return load_or_train_classifier(config.data.mnist_dir, config.eval.classifier_path)


def _torchvision(config: Config) -> nn.Module:
    if not config.eval.feature_weights:
        raise ConfigError("eval.feature_net=torchvision needs eval.feature_weights (a local state_dict file)")
    return TorchvisionFeatures(config.eval.feature_arch, config.eval.feature_weights)


FEATURE_NETS: dict[str, Callable[[Config], nn.Module]] = {
    "mnist_classifier": _mnist_classifier,
    "torchvision": _torchvision,
}


def build_feature_net(config: Config) -> nn.Module:
    """The feature network ``config.eval.feature_net`` names, in eval mode with gradients off."""
    name = config.eval.feature_net
    if name in FEATURE_NETS:
        network = FEATURE_NETS[name](config)
    else:
        module_name, _, attr = name.partition(":")
        try:
            network = getattr(importlib.import_module(module_name), attr)(config)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"eval.feature_net={name!r}: cannot import {attr!r} from {module_name!r} "
                              f"({err})") from err
    if not hasattr(network, "embed"):
        raise ConfigError(f"eval.feature_net={name!r} built a {type(network).__name__} without embed()")
    return network.eval().requires_grad_(False)
