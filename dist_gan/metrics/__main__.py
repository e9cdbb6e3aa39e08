"""``python -m dist_gan.metrics train-classifier --mnist_dir=DIR [--out=PATH] [--seed=0] [--limit=N]``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import fire

from dist_gan.data.sources import DataError
from dist_gan.metrics.classifier import cached_classifier_path, save_classifier, train_classifier


def train_classifier_command(mnist_dir: str, out: str | None = None, seed: int = 0, epochs: int = 3,
                             limit: int | None = None) -> None:
    """Train an MNIST classifier (deterministic from ``seed`` on one machine) and save its weights,
    by default in the user cache; evaluate with it through ``--eval.classifier_path=PATH`` (a seed
    other than 0 is read from the cache without it). ``limit``: train on the first N images."""
    path = Path(out) if out else cached_classifier_path(seed)
    for name, value in (("limit", 1 if limit is None else limit), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            sys.exit(f"dist_gan.metrics: error: --{name}={value!r} must be a whole number >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        sys.exit(f"dist_gan.metrics: error: --seed={seed!r} must be a whole number")
    try:
        model, accuracy = train_classifier(mnist_dir, seed, epochs, limit)
    except DataError as err:
        sys.exit(f"dist_gan.metrics: error: {err}")
    save_classifier(model, accuracy, path)
    logging.getLogger(__name__).info("test accuracy %.4f; weights at %s", accuracy, path)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    fire.Fire({"train-classifier": train_classifier_command})


if __name__ == "__main__":
    main()
