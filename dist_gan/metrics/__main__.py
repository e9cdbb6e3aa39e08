"""``python -m dist_gan.metrics train-classifier --mnist_dir=DIR [--out=PATH] [--seed=0]``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import fire

from dist_gan.data.sources import DataError
from dist_gan.metrics.classifier import default_classifier_path, save_classifier, train_classifier


def train_classifier_command(mnist_dir: str, out: str | None = None, seed: int = 0, epochs: int = 3) -> None:
    """Train the reference MNIST classifier (deterministic from ``seed``) and cache its weights."""
    path = Path(out) if out else default_classifier_path(seed)
    try:
        model, accuracy = train_classifier(mnist_dir, seed, epochs)
    except DataError as err:
        sys.exit(f"dist_gan.metrics: error: {err}")
    save_classifier(model, accuracy, path)
    logging.getLogger(__name__).info("test accuracy %.4f; weights at %s", accuracy, path)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    fire.Fire({"train-classifier": train_classifier_command})


if __name__ == "__main__":
    main()
