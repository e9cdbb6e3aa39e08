"""Images from a generator: latents by seed, truncation, decoding in batches, a run's sample grid."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn

from dist_gan.config import ConfigError, DataConfig
from dist_gan.data.mixtures import MIXTURES

SAMPLE_GRID_SIZE = 64  # images in a run's sample grids
SAMPLE_POINTS = 1000  # points in a 2-D mixture run's scatter plots


def latent_size(generator: nn.Module) -> int:
    """``G.z_dim``, which every generator has (``models.base``'s calling convention)."""
    return int(getattr(generator, "z_dim"))


def num_classes(generator: nn.Module) -> int:
    """How many classes a conditional generator knows; 0 for an unconditional one."""
    known = getattr(generator, "num_classes", None)
    if isinstance(known, int):
        return known
    embed = getattr(getattr(generator, "condition", None), "embed", None)
    return embed.num_embeddings if embed is not None else 0


def truncate_latents(z: torch.Tensor, threshold: float, seed: int = 0) -> torch.Tensor:
    """BigGAN's truncation trick: entries of ``z`` outside [-threshold, threshold] are drawn again
    (from ``seed``) until none is, i.e. z from a normal truncated at the threshold."""
    rng = torch.Generator().manual_seed(seed)
    z = z.clone()
    outside = z.abs() > threshold
    while outside.any():
        z[outside] = torch.randn(int(outside.sum()), generator=rng, dtype=z.dtype)
        outside = z.abs() > threshold
    return z


def has_w_space(generator: nn.Module) -> bool:
    """Whether the generator truncates in its own w space (StyleGAN2's mapping with ``w_avg``)."""
    return hasattr(getattr(generator, "mapping", None), "w_avg")


@torch.no_grad()
def generate(generator: nn.Module, n: int, seed: int = 0, batch_size: int = 256,
             device: torch.device | str = "cpu", labels: torch.Tensor | None = None,
             truncation: float | None = None) -> torch.Tensor:
    """``n`` images in [-1, 1] (on the CPU) from latents drawn with ``seed``: same seed, same images.

    A conditional generator draws each image's class uniformly (from the same seed) unless ``labels``
    names them. The generator is in eval mode meanwhile (BatchNorm uses its running statistics).
    """
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent_size(generator), generator=rng)
    classes = num_classes(generator)
    if classes and labels is None:
        labels = torch.randint(0, classes, (n,), generator=rng)
    return decode(generator, z, batch_size, device, labels, truncation)


@torch.no_grad()
def decode(generator: nn.Module, z: torch.Tensor, batch_size: int, device: torch.device | str,
           labels: torch.Tensor | None = None, truncation: float | None = None) -> torch.Tensor:
    """Images (fp32, on the CPU) of latents ``z`` (and ``labels``) in batches, the generator in eval
    mode meanwhile (BatchNorm uses its running statistics); any weight dtype.

    ``truncation`` (None: off) trades variety for fidelity: for a generator with a w space
    (stylegan2) w is pulled towards the average w, psi = ``truncation`` (1: none); for the others z
    is truncated at that threshold (BigGAN's trick: 0.5 to 1 is typical)."""
    extra = {}
    if truncation is not None:
        if not isinstance(truncation, (int, float)) or isinstance(truncation, bool) or not (
                math.isfinite(truncation) and truncation > 0):
            raise ConfigError(f"--truncation={truncation!r} must be a finite number > 0")
        if has_w_space(generator):
            extra = {"truncation": float(truncation)}
        else:
            z = truncate_latents(z.cpu(), float(truncation)).to(z.device)
    was_training = generator.training
    generator.eval()
    label_chunks = labels.split(batch_size) if labels is not None else [None] * len(z.split(batch_size))
    images = torch.cat([
        generator(chunk.to(device), None if y is None else y.to(device), **extra).float().cpu()
        for chunk, y in zip(z.split(batch_size), label_chunks)])
    generator.train(was_training)
    return images


def sample_count(data: DataConfig) -> int:
    """Samples in each of a run's sample pictures: a grid of images, or a scatter plot of points."""
    return SAMPLE_POINTS if data.source in MIXTURES else SAMPLE_GRID_SIZE


def picture_extent(data: DataConfig) -> float | None:
    """The half-width of a 2-D mixture's scatter plots (the same square in every picture of a run)."""
    return MIXTURES[data.source].extent if data.source in MIXTURES else None


def sample_grid(generator: nn.Module, fixed_z: torch.Tensor, num_classes: int,
                   truncation: float | None = None) -> torch.Tensor:
    """The sample grid: fixed latents; for a conditional model row r (of 8) shows class r."""
    labels = torch.arange(len(fixed_z), device=fixed_z.device) // 8 % num_classes if num_classes else None
    return decode(generator, fixed_z, len(fixed_z), fixed_z.device, labels, truncation)


def parse_ranges(value: object, flag: str = "--seeds") -> list[int]:
    """``0-35,40`` as whole numbers in the given order (ranges inclusive), for ``flag`` (--seeds,
    --rows, --cols, --layers); fire may hand over an int or a tuple. A malformed value is a
    ConfigError naming the flag and the value."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    found: list[int] = []
    for part in parts:
        text = str(part).strip()
        first, dash, last = text.partition("-")
        if isinstance(part, bool) or not first.isdigit() or (dash and not last.isdigit()):
            raise ConfigError(f"{flag}={value!r}: {text!r} is not a whole number >= 0 or a range of them "
                              f"(e.g. {flag}=0-35,40)")
        if dash and int(last) < int(first):
            raise ConfigError(f"{flag}={value!r}: the range {text} runs backwards")
        found.extend(range(int(first), int(last if dash else first) + 1))
    if not found:
        raise ConfigError(f"{flag}={value!r} names nothing (e.g. {flag}=0-35,40)")
    return found


def seed_latent(generator: nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The latent of ``seed`` (1, z_dim), and its class for a conditional generator: drawn from a
    generator of its own, so a seed's image does not depend on which other seeds are drawn."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(1, latent_size(generator), generator=rng)
    classes = num_classes(generator)
    return z, (torch.randint(0, classes, (1,), generator=rng) if classes else None)


@torch.no_grad()
def generate_seeds(generator: nn.Module, seeds: list[int], truncation: float | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """One image per seed, in order (N, C, H, W) on the CPU. Each is made alone, with the global RNG
    (StyleGAN2's per-pixel noise) seeded by its seed in a forked RNG state: the same seed gives the
    same image whatever else is drawn, on any machine's CPU."""
    images = []
    for seed in seeds:
        z, labels = seed_latent(generator, seed)
        with seeded_noise(seed, device):
            images.append(decode(generator, z, 1, device, labels, truncation))
    return torch.cat(images)


@contextlib.contextmanager
def seeded_noise(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """The global RNG (what a network's own noise draws from) seeded by ``seed`` inside, restored
    after: a picture's noise is its seed's, and nothing outside changes."""
    where = torch.device(device)
    devices = [where.index or 0] if where.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
