"""Mode coverage as the mode-collapse tables count it (VEEGAN, PacGAN, R3GAN's StackedMNIST): each
sample is assigned a mode (or none), and the figures are the modes hit, KL(p_samples || uniform)
over the modes, and the share of samples that hit one.

The feature networks of the two protocols carry the assignment (``mode_ids``), so the evaluator
adds these figures whenever the run's feature network has one:

- ``stacked_mnist_classifier`` (auto for ``data.source: stacked_mnist``): each channel read by the
  MNIST classifier; the mode is the triple of digits, 1000 of them. Features: the three channels'
  classifier features side by side (384-d), for FID/KID/precision/recall.
- ``points`` (auto for the 2-D mixtures): the point itself as the feature (2-d); the mode is the
  nearest mean when within 3 standard deviations (a high-quality sample, PacGAN's definition),
  else none.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.data.mixtures import MIXTURE_TEST_SIZE, Mixture
from dist_gan.data.sources import STACKED_MNIST_MODES, STACKED_MNIST_TEST_SIZE
from dist_gan.metrics.classifier import MnistClassifier

MNIST_SIZE = 28
DIGITS = 10


def coverage_figures(ids: torch.Tensor, modes: int) -> dict[str, float]:
    """Modes hit by ``ids`` (a mode per sample, -1 for none), KL(p || uniform) over the modes with p
    the histogram of the samples that hit one (PacGAN's reverse KL; R3GAN's StackedMNIST KL), and the
    share of samples that hit a mode."""
    hit = ids[ids >= 0]
    counts = torch.bincount(hit, minlength=modes).double()
    p = counts[counts > 0] / max(len(hit), 1)
    kl = float((p * (p * modes).log()).sum()) if len(hit) else math.inf
    return {"modes": int((counts > 0).sum()), "modes_kl": kl, "mode_hit_share": len(hit) / max(len(ids), 1)}


class StackedMnistFeatures(nn.Module):
    """The MNIST classifier read on each of the three channels of a StackedMNIST sample (padding
    around 28 px cropped off, smaller samples resized up). Logits: the 1000 triples' log-probabilities
    log p(a) + log p(b) + log p(c), so their argmax is the triple of each channel's digit."""

    data_classes = False  # the triples' histogram is in the mode figures
    modes = STACKED_MNIST_MODES
    protocol_samples = STACKED_MNIST_TEST_SIZE  # 26,000 generated samples (VEEGAN, PacGAN, R3GAN)

    def __init__(self, classifier: MnistClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = 3 * int(classifier.num_features)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = images.shape[-1]
        if size > MNIST_SIZE:
            start = (size - MNIST_SIZE) // 2
            images = images[..., start:start + MNIST_SIZE, start:start + MNIST_SIZE]
        elif size < MNIST_SIZE:
            images = F.interpolate(images, size=(MNIST_SIZE, MNIST_SIZE), mode="bilinear")
        count = images.shape[0]
        features, logits = self.classifier.embed(images.reshape(count * 3, 1, MNIST_SIZE, MNIST_SIZE))
        logp = logits.log_softmax(1).view(count, 3, DIGITS)
        triples = logp[:, 0, :, None, None] + logp[:, 1, None, :, None] + logp[:, 2, None, None, :]
        return features.reshape(count, -1), triples.reshape(count, -1)

    def mode_ids(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1)


class PointFeatures(nn.Module):
    """A 2-D mixture's points as their own features; logits -d^2 / (2 sigma^2) to each mean."""

    data_classes = False  # the modes' histogram is in the mode figures
    takes_pixels = False  # points are not quantised to 8 bits before they are judged
    num_features = 2
    protocol_samples = MIXTURE_TEST_SIZE  # PacGAN scores 2,500 samples

    def __init__(self, mixture: Mixture):
        super().__init__()
        self.mixture = mixture
        self.modes = mixture.modes

    def embed(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = points.flatten(1).float()
        distance = torch.cdist(flat, self.mixture.means.to(flat.device)) / self.mixture.sigma
        return flat, -0.5 * distance.square()

    def mode_ids(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.mixture.nearest(features)
