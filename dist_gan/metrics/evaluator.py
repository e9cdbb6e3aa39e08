"""Quality of a generator against real-data statistics (the training-time Evaluator), and the
reference statistics of a data set (``dist-gan evaluate --reference DATA --out stats.npz``)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn

from dist_gan.config import Config, ConfigError, DataConfig
from dist_gan.core.seeds import derive
from dist_gan.data import folder_fingerprint
from dist_gan.data.sources import (
    CIFAR10_FOLDER,
    DATA_SOURCES,
    MNIST_FILES,
    ImageSet,
    find_mnist_file,
    limit_images,
    to_model_range,
)
from dist_gan.metrics.classifier import cache_dir, fingerprint
from dist_gan.metrics.modes import coverage_figures
from dist_gan.metrics.networks import build_feature_net
from dist_gan.metrics.quality import Embedder, ModeNet, Reference, quality
from dist_gan.models.sampling import generate

log = logging.getLogger(__name__)


def embed_image_set(images: ImageSet, embed: Embedder) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of every image of ``images``, read ``embed.batch_size`` at a time (a large
    folder never sits in memory whole)."""
    feats, logits = [], []
    for start in range(0, len(images), embed.batch_size):
        chunk = [images[i][0] for i in range(start, min(start + embed.batch_size, len(images)))]
        chunk_feats, chunk_logits = embed(to_model_range(torch.stack(chunk)))
        feats.append(chunk_feats)
        logits.append(chunk_logits)
    return torch.cat(feats), torch.cat(logits)


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12]


def _files_digest(paths: list[Path]) -> str:
    """Which files these are and their state: resolved path, size and modification time of each."""
    return _digest(*(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths))


def data_fingerprint(data: DataConfig, split: str) -> str | None:
    """What a split's images were read from, for keying cached embeddings: the folder's images,
    the MNIST images file's content (a directory of other IDX files, Fashion-MNIST say, differs),
    the CIFAR-10 batch files; None for a source it cannot tell (then nothing is cached)."""
    if data.source == "folder":
        return folder_fingerprint(Path(data.root), data.follow_symlinks)["digest"][:12]
    if data.source == "mnist":
        if not data.mnist_dir:
            return "torchvision"  # torchvision's download, checked against its MD5s
        images = find_mnist_file(data.mnist_dir, MNIST_FILES[f"{split}_images"])
        return hashlib.sha256(images.read_bytes()).hexdigest()[:12]
    if data.source == "cifar10":
        folder = Path(data.root) / CIFAR10_FOLDER
        return _files_digest(sorted(folder.glob("*_batch*"))) if folder.is_dir() else "torchvision"
    if data.source == "synthetic":
        return "seeded"
    if data.source == "stacked_mnist":  # drawn with fixed seeds from MNIST: its digits and the set's size
        return f"{data_fingerprint(dataclasses.replace(data, source='mnist'), split)}-{data.limit}"
    return None


def real_embeddings(data: DataConfig, split: str, embed: Embedder) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of the real ``split`` (all of it: data.limit does not apply, so a
    limited-data run is measured against the whole set), cached per dataset and its files, size and
    network."""
    data = data.as_read()
    origin = data_fingerprint(data, split)
    key = (f"{data.source}-{origin}-{split}-{data.resolution}px-{data.channels}ch-"
           f"{fingerprint(embed.network)}")
    path = cache_dir() / "real_embeddings" / f"{key}.pt"
    if origin is not None and path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            return cached["features"], cached["logits"]
        except Exception as err:  # a damaged or foreign cache file: computed again, never unpickled
            log.warning("ignoring the unreadable embedding cache %s (%s): computing it again", path,
                        type(err).__name__)
    feats, logits = embed_image_set(DATA_SOURCES[data.source](data, split), embed)
    if origin is None:
        return feats, logits
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"features": feats, "logits": logits}, tmp)
    tmp.replace(path)
    log.info("cached %d real %s embeddings at %s", len(feats), split, path)
    return feats, logits


def figures(reference: Reference, network: nn.Module, feats: torch.Tensor, logits: torch.Tensor,
            seed: int) -> dict[str, float]:
    """``quality`` of generated (or real test) embeddings and, when the feature network assigns modes
    (``metrics/modes.py``), their mode coverage."""
    out = quality(reference, feats, logits, seed=seed, data_classes=bool(getattr(network, "data_classes", True)))
    if hasattr(network, "mode_ids"):
        modes = cast(ModeNet, network)
        out.update(coverage_figures(modes.mode_ids(feats, logits), modes.modes))
    return out


def reference_meta(config: Config, network: nn.Module, description: str) -> dict:
    """What identifies a feature space and the data its statistics came from."""
    return {"feature_net": config.eval.resolved_feature_net(config.data), "fingerprint": fingerprint(network),
            "num_features": int(getattr(network, "num_features", 0)), "data": description,
            "resolution": config.data.resolution, "channels": config.data.channels}


def load_reference(path: str | Path, config: Config, network: nn.Module) -> Reference:
    """Reference statistics from ``path``, refused (naming the file) when another feature network
    made them: an FID across two feature spaces means nothing."""
    try:
        reference = Reference.load(path)
    except ValueError as err:
        raise ConfigError(f"eval.reference_stats: {err}") from None
    expected = reference_meta(config, network, "")
    meta = reference.meta
    if meta.get("fingerprint") and meta["fingerprint"] != expected["fingerprint"]:
        raise ConfigError(f"eval.reference_stats={path} was computed with feature network "
                          f"{meta.get('feature_net')} (weights {meta['fingerprint']}); this run's is "
                          f"{expected['feature_net']} (weights {expected['fingerprint']}): recompute it "
                          "with dist-gan evaluate --reference DATA --out FILE and the same eval.feature_net")
    if expected["num_features"] and len(reference.mean) != expected["num_features"]:
        raise ConfigError(f"eval.reference_stats={path} holds {len(reference.mean)}-d statistics; "
                          f"{expected['feature_net']} gives {expected['num_features']}-d features")
    if meta.get("resolution") not in (None, config.data.resolution):
        log.warning("eval.reference_stats %s was computed from %s px images; this run's data is %d px",
                    path, meta["resolution"], config.data.resolution)
    return reference


class Evaluator:
    """Built once per run: the feature network and the real statistics; called every eval.every."""

    def __init__(self, config: Config, device: torch.device | str = "cpu"):
        config = dataclasses.replace(config, data=config.data.as_read())  # a data.folder run: its folder
        self.config = config
        self.network = network = build_feature_net(config)
        self.embed = Embedder(network, config.eval.batch_size, device)
        if config.eval.reference_stats:
            self.reference = load_reference(config.eval.reference_stats, config, network)
        else:
            real_feats, _ = real_embeddings(config.data, config.eval.real_split, self.embed)
            self.reference = Reference.from_features(real_feats, keep=len(real_feats))

    def __call__(self, generator: nn.Module, accelerator) -> dict[str, float] | None:
        """Every rank generates and embeds its share; rank 0 gets the figures, the others None."""
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
        return figures(self.reference, self.network, feats, logits, self.config.run.seed)


def write_reference(config: Config, split: str, out: str | Path, description: str) -> Reference:
    """Embed all of ``config.data``'s ``split`` (data.limit applied) with ``config.eval``'s feature
    network and save its Reference to ``out`` (on the GPU when there is one)."""
    network = build_feature_net(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    embed = Embedder(network, config.eval.batch_size, device)
    images = DATA_SOURCES[config.data.source](config.data, split)
    if split == "train":
        images = limit_images(images, config.data.limit)
    log.info("embedding %d images of %s with %s on %s", len(images), description,
             config.eval.resolved_feature_net(config.data), device)
    feats, _ = embed_image_set(images, embed)
    reference = Reference.from_features(feats, reference_meta(config, network, description))
    reference.save(out)
    log.info("reference statistics of %d images written to %s", reference.count, out)
    return reference
