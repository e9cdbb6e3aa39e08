"""Mode coverage as the mode-collapse tables count it (VEEGAN, PacGAN, R3GAN's StackedMNIST):
each sample is assigned a mode id (or -1, no mode), and the figures are the number of modes hit
and KL(p_samples || uniform over the modes).

A coverage is looked up by data source (``MODE_COVERAGES``); ``Evaluator`` adds its figures to the
quality figures when the run's data has one. StackedMNIST: each channel read by the reference MNIST
classifier, the mode the triple of digits (1000 modes; the protocol draws 26,000 samples).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import Config
from dist_gan.data.sources import STACKED_MNIST_MODES

MNIST_SIZE = 28


class ModeCoverage(Protocol):
    modes: int

    def assign(self, samples: torch.Tensor) -> torch.Tensor: ...


def coverage_figures(ids: torch.Tensor, modes: int) -> dict[str, float]:
    """Modes hit by ``ids`` (mode per sample, -1 for none) and KL(p || uniform) over the modes,
    p the histogram of the samples that hit a mode (PacGAN's reverse KL on its mixtures)."""
    hit = ids[ids >= 0]
    counts = torch.bincount(hit, minlength=modes).double()
    p = counts / max(len(hit), 1)
    kl = float((p[p > 0] * (p[p > 0] * modes).log()).sum()) if len(hit) else math.inf
    return {"modes": int((counts > 0).sum()), "modes_kl": kl, "mode_hit_share": len(hit) / max(len(ids), 1)}


class StackedMnistModes:
    """The triple of digits (100 a + 10 b + c) the MNIST classifier reads in the three channels."""

    modes = STACKED_MNIST_MODES

    def __init__(self, classifier: nn.Module, batch_size: int = 500):
        self.classifier, self.batch_size = classifier, batch_size

    @torch.no_grad()
    def assign(self, samples: torch.Tensor) -> torch.Tensor:
        """Mode ids of samples (N, 3, H, W) in [-1, 1]: padding around 28 px is cropped off (what
        the source added), smaller images are resized up."""
        size = samples.shape[-1]
        if size > MNIST_SIZE:
            start = (size - MNIST_SIZE) // 2
            samples = samples[..., start:start + MNIST_SIZE, start:start + MNIST_SIZE]
        elif size < MNIST_SIZE:
            samples = F.interpolate(samples, size=(MNIST_SIZE, MNIST_SIZE), mode="bilinear")
        digits = []
        device = next(self.classifier.parameters()).device
        for chunk in samples.split(self.batch_size):
            channels = chunk.float().to(device).flatten(0, 1).unsqueeze(1)  # (3n, 1, 28, 28)
            digits.append(self.classifier(channels).argmax(1).view(-1, 3).cpu())
        return (torch.cat(digits) * torch.tensor([100, 10, 1])).sum(1)


def _stacked_mnist(config: Config) -> StackedMnistModes:
    from dist_gan.metrics.classifier import load_or_train_classifier

    return StackedMnistModes(load_or_train_classifier(config.data.mnist_dir, config.eval.classifier_path))


MODE_COVERAGES: dict[str, Callable[[Config], ModeCoverage]] = {
    "stacked_mnist": _stacked_mnist,
}


def build_mode_coverage(config: Config) -> ModeCoverage | None:
    """The mode coverage of the run's data source, or None when it has none."""
    build = MODE_COVERAGES.get(config.data.as_read().source)
    return build(config) if build is not None else None
