"""Feature networks by name (``eval.feature_net``) for FID/KID/IS and class coverage.

A feature network is an ``nn.Module`` with ``embed(images in [-1, 1], N x C x H x W) -> (features
N x d, logits N x classes)``; ``data_classes = True`` when its logits are the data set's own classes
(then the class histogram is reported). Built in:

- ``inception``: the FID Inception-v3 of pytorch-fid, torch-fidelity, clean-fid and torchmetrics
  (TensorFlow's 2015 graph ported), 2048-d pool features, so FIDs compare with papers. The default
  for any data but MNIST (``auto``).
- ``mnist_classifier``: a small MNIST classifier (trained on first use, cached); the default for MNIST.
- ``torchvision`` (``eval.feature_arch``, e.g. resnet18, with a local ``eval.feature_weights`` file).
- ``stacked_mnist_classifier`` and ``points``: the mode-coverage protocols' networks (``metrics/modes.py``),
  the defaults for StackedMNIST and the 2-D mixtures.

Your own: ``eval.feature_net: my_package.my_module:build`` names a function ``build(config) -> module``.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Callable, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import Config, ConfigError
from dist_gan.data.mixtures import MIXTURES
from dist_gan.metrics.classifier import MnistClassifier, load_or_train_classifier
from dist_gan.metrics.modes import PointFeatures, StackedMnistFeatures

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionFeatures(nn.Module):
    """A torchvision classifier with a final ``fc`` layer (ResNets, Inception v3, GoogLeNet):
    features before ``fc``, logits after it. Inputs are resized and ImageNet-normalised."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    data_classes = False  # ImageNet's classes, not the data's

    def __init__(self, arch: str, weights_path: str, size: int = 224):
        super().__init__()
        from torchvision.models import get_model

        model = get_model(arch, weights=None)
        try:
            model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, pickle.UnpicklingError, KeyError, ValueError, AttributeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"eval.feature_weights={weights_path} cannot be loaded into torchvision's "
                              f"{arch}: {reason[:200]}") from None
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


INCEPTION_SIZE = 299
# torch-fidelity's layer names, input to pool, of the FID Inception-v3
INCEPTION_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                   "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                   "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def inception_weights_help() -> str:
    """Where the FID Inception weights come from, and how to supply them without internet."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    return (f"download {URL_INCEPTION_V3} (the same network as pytorch-fid's pt_inception-2015-12-05-"
            f"6726825d.pth) on a machine with internet and set eval.feature_weights=/path/to/that/file "
            f"(dist-gan evaluate: --feature_weights), or copy it to {cached}")


def fid_inception(weights_path: str | None) -> nn.Module:
    """The FID Inception-v3 trunk and ``fc`` of torch-fidelity, built from its layers, its weights
    read with ``weights_only=True`` (torch-fidelity's own loader unpickles them with
    ``weights_only=False``: a file from elsewhere could run code). ``weights_path`` None: torch hub's
    cache of torch-fidelity's URL, downloaded there if absent."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    layers = {
        "Conv2d_1a_3x3": fidelity.BasicConv2d(3, 32, kernel_size=3, stride=2),
        "Conv2d_2a_3x3": fidelity.BasicConv2d(32, 32, kernel_size=3),
        "Conv2d_2b_3x3": fidelity.BasicConv2d(32, 64, kernel_size=3, padding=1),
        "MaxPool_1": nn.MaxPool2d(kernel_size=3, stride=2),
        "Conv2d_3b_1x1": fidelity.BasicConv2d(64, 80, kernel_size=1),
        "Conv2d_4a_3x3": fidelity.BasicConv2d(80, 192, kernel_size=3),
        "MaxPool_2": nn.MaxPool2d(kernel_size=3, stride=2),
        "Mixed_5b": fidelity.InceptionA(192, pool_features=32),
        "Mixed_5c": fidelity.InceptionA(256, pool_features=64),
        "Mixed_5d": fidelity.InceptionA(288, pool_features=64),
        "Mixed_6a": fidelity.InceptionB(288),
        "Mixed_6b": fidelity.InceptionC(768, channels_7x7=128),
        "Mixed_6c": fidelity.InceptionC(768, channels_7x7=160),
        "Mixed_6d": fidelity.InceptionC(768, channels_7x7=160),
        "Mixed_6e": fidelity.InceptionC(768, channels_7x7=192),
        "Mixed_7a": fidelity.InceptionD(768),
        "Mixed_7b": fidelity.InceptionE_1(1280),
        "Mixed_7c": fidelity.InceptionE_2(2048),
        "AvgPool": nn.AdaptiveAvgPool2d(output_size=(1, 1)),
        "fc": nn.Linear(2048, 1008),
    }
    net = nn.Module()
    for name, layer in layers.items():
        net.add_module(name, layer)
    if weights_path is None:
        state = torch.hub.load_state_dict_from_url(fidelity.URL_INCEPTION_V3, map_location="cpu",
                                                   progress=False, weights_only=True)
    else:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class InceptionFeatures(nn.Module):
    """The FID Inception-v3, as torch-fidelity builds it (the network torchmetrics'
    ``FrechetInceptionDistance(feature=2048)`` uses): 2048-d pool features; logits are its 1008
    unbiased logits (torch-fidelity's Inception Score).

    Preprocessing, as clean-fid's "clean" mode: images in [-1, 1] are quantised to 8 bits (what a
    saved PNG holds, so real and generated images are treated alike), grey is repeated to RGB, then
    resized to 299 x 299 by ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` on
    float values in [0, 255] (PIL's antialiased bicubic filter, a = -0.5) with no re-quantisation,
    and scaled to [-1, 1) by (x - 128) / 128 as the network expects. Inputs run in chunks of
    ``chunk`` images (a 299 px batch of 500 would need ~10 GB of activations).
    """

    num_features = 2048
    data_classes = False

    def __init__(self, weights_path: str | None = None, chunk: int = 50):
        super().__init__()
        try:
            import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401 (its layers build the net)
        except ImportError as err:
            raise ConfigError("eval.feature_net=inception needs torch-fidelity: pip install torch-fidelity") from err
        if weights_path is not None and not Path(weights_path).is_file():
            raise ConfigError(f"eval.feature_weights={weights_path}: no such file; "
                              f"{inception_weights_help()}")
        try:
            self.net = fid_inception(weights_path)
        except (OSError, RuntimeError, pickle.UnpicklingError, KeyError, ValueError, AttributeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            where = f"from eval.feature_weights={weights_path}" if weights_path else "(download failed)"
            raise ConfigError(f"eval.feature_net=inception: cannot load the FID Inception weights "
                              f"{where}: {reason}; {inception_weights_help()}") from None
        self.chunk = chunk

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._embed(part) for part in images.split(self.chunk)]
        return torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = ((images.float() + 1) * 127.5).round().clamp(0, 255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bicubic", antialias=True,
                          align_corners=False)
        x = (x - 128) / 128
        for name in INCEPTION_TRUNK:
            x = getattr(self.net, name)(x)
        features = x.flatten(1)
        return features, features @ cast(nn.Linear, self.net.fc).weight.T


def _inception(config: Config) -> nn.Module:
    return InceptionFeatures(config.eval.feature_weights)


def _mnist_classifier(config: Config) -> MnistClassifier:
    return load_or_train_classifier(config.data.mnist_dir, config.eval.classifier_path)


def _stacked_mnist_classifier(config: Config) -> nn.Module:
    return StackedMnistFeatures(_mnist_classifier(config))


def _points(config: Config) -> nn.Module:
    source = config.data.as_read().source
    if source not in MIXTURES:
        raise ConfigError(f"eval.feature_net=points reads 2-D points; data.source={source} is not one of "
                          f"the mixtures {sorted(MIXTURES)}")
    return PointFeatures(MIXTURES[source])


def _torchvision(config: Config) -> nn.Module:
    if not config.eval.feature_weights:
        raise ConfigError("eval.feature_net=torchvision needs eval.feature_weights (a local state_dict file)")
    return TorchvisionFeatures(config.eval.feature_arch, config.eval.feature_weights)


FEATURE_NETS: dict[str, Callable[[Config], nn.Module]] = {
    "inception": _inception,
    "mnist_classifier": _mnist_classifier,
    "torchvision": _torchvision,
    "stacked_mnist_classifier": _stacked_mnist_classifier,
    "points": _points,
}


def build_feature_net(config: Config) -> nn.Module:
    """The feature network ``config.eval.feature_net`` names (``auto`` resolved), in eval mode with
    gradients off."""
    name = config.eval.resolved_feature_net(config.data)
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
