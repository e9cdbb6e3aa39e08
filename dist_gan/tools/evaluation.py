"""Evaluating a run's checkpoint: its generator's figures beside the real-data floor."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_gan.config import load_config
from dist_gan.metrics.evaluator import Evaluator, figures, real_embeddings
from dist_gan.models.sampling import generate
from dist_gan.tools.generate import generator_from_checkpoint

DEFAULT_EVAL_SAMPLES = 10_000


def evaluate_checkpoint(checkpoint: str | Path, n: int | None = None, ema: bool = True, seed: int = 0,
                        mnist_dir: str | None = None, reference_stats: str | None = None,
                        feature_weights: str | None = None,
                        feature_net: str = "auto") -> dict[str, dict]:
    """Figures for a checkpoint's generator and, as the floor, for real test data vs real train
    (the floor only when the real data is at hand: not with ``reference_stats``). ``feature_net``
    other than auto replaces the run's eval.feature_net. ``n`` None: the mode-coverage protocol's
    sample count when the feature network has one (StackedMNIST 26,000; the mixtures 2,500), else
    ``DEFAULT_EVAL_SAMPLES``."""
    generator, source = generator_from_checkpoint(checkpoint, ema=ema)
    config = load_config(source / "config.yaml")
    if feature_net != "auto":
        config = load_config(source / "config.yaml", {"eval.feature_net": feature_net})
    config.data.mnist_dir = mnist_dir or config.data.mnist_dir
    config.eval.reference_stats = reference_stats or config.eval.reference_stats
    config.eval.feature_weights = feature_weights or config.eval.feature_weights
    device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluator = Evaluator(config, device)
    config = evaluator.config
    n = n or int(getattr(evaluator.network, "protocol_samples", DEFAULT_EVAL_SAMPLES))
    images = generate(generator.to(device), n, seed, config.eval.batch_size, device)
    fake_feats, fake_logits = evaluator.embed(images)
    results: dict[str, dict] = {
        "generated": figures(evaluator.reference, evaluator.network, fake_feats, fake_logits, seed)}
    if not config.eval.reference_stats:
        test_feats, test_logits = real_embeddings(config.data, "test", evaluator.embed)
        m = min(n, len(test_feats))
        results["real test (floor)"] = figures(evaluator.reference, evaluator.network, test_feats[:m],
                                               test_logits[:m], seed)
    results["_source"] = {"checkpoint": str(source), "n": n, "ema": ema,
                          "feature_net": config.eval.resolved_feature_net(config.data)}
    return results
