"""Quality of a generator against cached real-data embeddings, in training and from a checkpoint."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn as nn

from dist_gan.config import Config, DataConfig, load_config
from dist_gan.data.sources import DATA_SOURCES, to_model_range
from dist_gan.metrics.classifier import cache_dir, fingerprint
from dist_gan.seeds import derive
from dist_gan.metrics.networks import build_feature_net
from dist_gan.metrics.quality import Embedder, quality
from dist_gan.sample import generate, load_generator

log = logging.getLogger(__name__)


def real_embeddings(data: DataConfig, split: str, embed: Embedder) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of the real ``split``, cached per dataset, resolution and network."""
    key = f"{data.source}-{split}-{data.resolution}px-{data.channels}ch-{fingerprint(embed.network)}"
    path = cache_dir() / "real_embeddings" / f"{key}.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        return cached["features"], cached["logits"]
    images = DATA_SOURCES[data.source](data, split)
    pixels = to_model_range(torch.stack([images[i][0] for i in range(len(images))]))
    feats, logits = embed(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"features": feats, "logits": logits}, tmp)
    tmp.replace(path)
    log.info("cached %d real %s embeddings at %s", len(feats), split, path)
    return feats, logits


class Evaluator:
    """Built once per run: the reference network and the real embeddings; called every eval.every."""

    def __init__(self, config: Config):
        self.config = config
        self.embed = Embedder(build_feature_net(config), config.eval.batch_size)
        self.real_feats, _ = real_embeddings(config.data, config.eval.real_split, self.embed)

    def __call__(self, generator: nn.Module, accelerator) -> dict[str, float] | None:
        """Every rank generates its share; rank 0 gets the figures, the others None."""
        cfg = self.config.eval
        share = math.ceil(cfg.n_samples / accelerator.num_processes)
        # The same latents at every evaluation (per rank), so the curve shows the generator changing.
        seed = derive(self.config.run.seed, "eval", accelerator.process_index)
        images = generate(generator, share, seed, cfg.batch_size, accelerator.device)
        feats, logits = self.embed(images)
        feats = accelerator.gather(feats.to(accelerator.device))[: cfg.n_samples].cpu()
        logits = accelerator.gather(logits.to(accelerator.device))[: cfg.n_samples].cpu()
        if not accelerator.is_main_process:
            return None
        return quality(self.real_feats, feats, logits, seed=self.config.run.seed)


def evaluate_checkpoint(checkpoint: str | Path, n: int, ema: bool = True, seed: int = 0,
                        mnist_dir: str | None = None) -> dict[str, dict[str, float]]:
    """Figures for a checkpoint's generator and, as the floor, for real test data vs real train."""
    generator, source = load_generator(checkpoint, ema=ema)
    config = load_config(source / "config.yaml")
    if mnist_dir:
        config.data.mnist_dir = mnist_dir
    embed = Embedder(build_feature_net(config), config.eval.batch_size)
    train_feats, _ = real_embeddings(config.data, "train", embed)
    test_feats, test_logits = real_embeddings(config.data, "test", embed)
    images = generate(generator, n, seed, config.eval.batch_size)
    fake_feats, fake_logits = embed(images)
    m = min(n, len(test_feats))
    return {"generated": quality(train_feats, fake_feats, fake_logits, seed),
            "real test (floor)": quality(train_feats, test_feats[:m], test_logits[:m], seed),
            "_source": {"checkpoint": str(source), "n": n, "ema": ema}}
