"""The reference feature network for MNIST: a small CNN whose penultimate layer embeds images for
FID/KID/precision/recall and whose logits give the classifier Inception Score and the class histogram.

Trained once, deterministically from its seed, and cached in the user cache directory
(``$DIST_GAN_CACHE``, else ``$XDG_CACHE_HOME/dist_gan``, else ``~/.cache/dist_gan``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import ConfigError
from dist_gan.data.sources import load_mnist_idx, to_grey, to_model_range

log = logging.getLogger(__name__)
FEATURES = 128


def cache_dir() -> Path:
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    root = os.environ.get("DIST_GAN_CACHE") or cache_home / "dist_gan"
    return Path(root)


class MnistClassifier(nn.Module):
    """LeNet-style CNN on 28x28 grey images in [-1, 1]: 128-d features, 10 logits."""

    num_features = FEATURES
    data_classes = True  # its logits are the digits: the class histogram means something

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5)
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.fc = nn.Linear(64 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits of images in [-1, 1] at any resolution, grey or RGB."""
        if images.shape[1] == 3:
            images = to_grey(images)
        if images.shape[-1] != 28:
            images = F.interpolate(images, size=(28, 28), mode="bilinear", antialias=True)
        features = self.features(images)
        return features, self.head(features)


def _as_input(images: torch.Tensor) -> torch.Tensor:
    return to_model_range(images).unsqueeze(1) if images.dtype == torch.uint8 else images


@torch.no_grad()
def accuracy(model: MnistClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(_as_input(x)).argmax(1) == y).sum())
                  for x, y in zip(images.split(1000), labels.split(1000)))
    return correct / len(labels)


def train_classifier(mnist_dir: str, seed: int = 0, epochs: int = 3,
                     limit: int | None = None) -> tuple[MnistClassifier, float]:
    """Train on MNIST train (its first ``limit`` images if given), deterministically from ``seed`` on
    one machine; return the model and its accuracy on all of MNIST test."""
    torch.manual_seed(seed)
    images, labels = load_mnist_idx(mnist_dir, "train")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    model = MnistClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order_rng = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for group in optimizer.param_groups:  # a lower rate for the last epoch settles the weights
            group["lr"] = 1e-3 if epoch < epochs - 1 else 2e-4
        model.train()
        for index in torch.randperm(len(images), generator=order_rng).split(128):
            loss = F.cross_entropy(model(_as_input(images[index])), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        log.info("classifier epoch %d: loss %.4f", epoch + 1, loss.item())
    test_images, test_labels = load_mnist_idx(mnist_dir, "test")
    return model.eval(), accuracy(model, test_images, test_labels)


# The reference every MNIST FID of dist_gan is measured with, shipped like FID's Inception weights:
# trained by `train-classifier` (seed 0, 3 epochs); retrained elsewhere, the same seed gives other
# weights wherever the CPU sums in another order, and FIDs in another feature space.
SHIPPED_CLASSIFIER = Path(__file__).with_name("mnist_classifier_seed0.pt")


def cached_classifier_path(seed: int = 0) -> Path:
    """Where ``train-classifier`` writes by default: the user cache."""
    return cache_dir() / f"mnist_classifier_seed{seed}.pt"


def default_classifier_path(seed: int = 0) -> Path:
    """The shipped reference for seed 0; a classifier of another seed from the user cache."""
    return SHIPPED_CLASSIFIER if seed == 0 else cached_classifier_path(seed)


def load_or_train_classifier(mnist_dir: str | None, path: str | Path | None = None,
                             seed: int = 0) -> MnistClassifier:
    """The classifier at ``path`` (default: the shipped reference, or the cache for another seed),
    training it first if the default cache file is absent. A named ``path`` that does not exist is
    refused: training one there would measure in another feature space without a word."""
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"eval.classifier_path={path}: no such file; write one there with "
                                f"`python -m dist_gan.metrics train-classifier --mnist_dir=DIR --out={path}`, "
                                "or unset it to use the shipped reference classifier")
    path = Path(path) if path else default_classifier_path(seed)
    if not path.is_file():
        if not mnist_dir:
            raise FileNotFoundError(f"no reference classifier at {path}; train it with `python -m "
                                    "dist_gan.metrics train-classifier --mnist_dir=DIR` or set data.mnist_dir")
        log.info("training the reference MNIST classifier once; it will be cached at %s", path)
        model, acc = train_classifier(mnist_dir, seed)
        save_classifier(model, acc, path)
    model = MnistClassifier()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        float(state["test_accuracy"])
    except Exception as err:  # pickle, zip, key or shape errors of a damaged or foreign file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"reference classifier {path} is not a dist_gan MNIST classifier "
                          f"({type(err).__name__}: {reason[:200]}); retrain it with `python -m "
                          "dist_gan.metrics train-classifier`") from None
    log.info("reference classifier %s (test accuracy %.4f)", path, state["test_accuracy"])
    return model.eval().requires_grad_(False)


def save_classifier(model: MnistClassifier, test_accuracy: float, path: Path) -> None:
    """Write atomically: a half-written cache file would otherwise poison every later run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
        torch.save({"model": model.state_dict(), "test_accuracy": test_accuracy}, tmp)
    os.replace(tmp.name, path)


def fingerprint(model: nn.Module) -> str:
    """A short hash of the weights, to key caches of features computed with them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]
