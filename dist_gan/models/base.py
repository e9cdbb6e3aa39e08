"""What every generator, discriminator and encoder shares: the calling conventions the losses use.

- Generator: ``G(z, labels=None) -> images``; ``G.z_dim``. A class-conditional generator
  (``model.num_classes > 0``) joins a learned label embedding to z (``ConditionalInput``).
- Discriminator: ``D(x, labels=None, return_features=False) -> logits`` (and, when asked, the last
  hidden features, which feature matching and the VAE-GAN reconstruction use). Subclasses provide
  ``self.body`` (images -> (N, F)); ``DiscriminatorHead`` turns features into logits, with the class
  projection of Miyato & Koyama (2018) when conditional and the minibatch standard-deviation feature
  when ``mbstd`` is set.
- Encoder (VAE-GAN): ``E(x) -> (mu, logvar)``, each (N, z_dim).

Also shared: the stage plan of the convolutional networks (``stage_plan``) and fp32 inputs and
outputs whatever the weights' dtype (``accept_fp32_io``, for DeepSpeed's bf16/fp16 weights).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from dist_gan.config import ConfigError


class ConditionalInput(nn.Module):
    """z, or z joined with a learned embedding of the class label.

    The embedding has as many dimensions as there are classes (a learned one-hot), far fewer than z:
    with as many as z it outweighed z and the generator drew one image per class.
    """

    def __init__(self, z_dim: int, num_classes: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, num_classes) if num_classes else None
        self.out_dim = z_dim + num_classes

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.embed is None:
            return z
        if labels is None:
            raise ValueError("this generator is class-conditional (model.num_classes > 0): pass labels")
        return torch.cat([z, self.embed(labels)], 1)


def minibatch_stddev(features: torch.Tensor, group: int = 4) -> torch.Tensor:
    """One feature per sample: the standard deviation of each feature over its group of samples,
    averaged (Karras et al. 2018's simplification of Salimans et al.'s minibatch discrimination).
    A discriminator that sees it can tell a batch of near-identical fakes from a varied real batch."""
    n = features.shape[0]
    g = max(d for d in range(1, min(group, n) + 1) if n % d == 0)
    grouped = features.float().view(g, n // g, -1)  # sample i is in group i % (n // g)
    std = grouped.var(0, unbiased=False).add(1e-8).sqrt().mean(1)  # (n // g,)
    return std.repeat(g).unsqueeze(1).to(features.dtype)


class DiscriminatorHead(nn.Module):
    def __init__(self, features: int, num_classes: int = 0, mbstd: bool = False):
        super().__init__()
        self.mbstd = mbstd
        self.linear = nn.Linear(features + int(mbstd), 1)
        self.embed = nn.Embedding(num_classes, features) if num_classes else None
        if self.embed is not None:
            # Small, as Miyato & Koyama's: with N(0, 1) the projection term (a sum over every
            # feature) dwarfs the linear one, D judges only "does x look like class y", and G learns
            # one image per class, ignoring z.
            nn.init.xavier_uniform_(self.embed.weight)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = torch.cat([h, minibatch_stddev(h)], 1) if self.mbstd else h
        logits = self.linear(x).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this discriminator is class-conditional: pass labels")
            logits = logits + (self.embed(labels) * h).sum(1)
        return logits


class Discriminator(nn.Module):
    """Base of the discriminators: ``self.body`` and ``self.head`` come from the subclass."""

    body: nn.Module
    head: nn.Module  # features (and labels) -> logits: a DiscriminatorHead, or R3GAN's own

    def blocks(self) -> list[nn.Module]:
        """The body's blocks from the input on (what Freeze-D counts); none by default."""
        return []

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                return_features: bool = False):
        h = self.body(x)
        logits = self.head(h, labels)
        return (logits, h) if return_features else logits


class PackedDiscriminator(nn.Module):
    """PacGAN's packing (Lin et al. 2018): ``inner``, built for ``pack`` times the channels, judges
    each group of ``pack`` consecutive samples at once, joined along channels: one logit per group.
    A generator that draws few modes shows it in a group (near-identical samples), not only in each
    sample, so D can punish it."""

    def __init__(self, inner: nn.Module, pack: int):
        super().__init__()
        self.inner, self.pack = inner, pack

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, return_features: bool = False):
        count = x.shape[0]
        if count % self.pack:
            raise ValueError(f"a batch of {count} cannot be packed in groups of {self.pack} "
                             "(model.discriminator.pack)")
        grouped = x.reshape(count // self.pack, self.pack * x.shape[1], *x.shape[2:])
        return self.inner(grouped, labels, return_features)

    def blocks(self) -> list[nn.Module]:
        return self.inner.blocks() if isinstance(self.inner, Discriminator) else []


def freeze_blocks(discriminator: nn.Module, count: int, arch: str) -> None:
    """Freeze-D: the first ``count`` blocks from the input keep their weights (``requires_grad``
    off; the optimiser is built over the trainable parameters only). A count the network cannot
    give names how many blocks it has."""
    if count == 0:
        return
    blocks = discriminator.blocks() if isinstance(discriminator, (Discriminator, PackedDiscriminator)) else []
    if not blocks:
        raise ConfigError(f"model.discriminator.freeze = {count}: a {arch} discriminator has no blocks to "
                          "freeze (dcgan, resnet, stylegan2 and r3gan have)")
    if count > len(blocks):
        raise ConfigError(f"model.discriminator.freeze = {count}: this {arch} discriminator has {len(blocks)} "
                          f"blocks (its head, after them, always trains)")
    for block in blocks[:count]:
        block.requires_grad_(False)


def stage_plan(resolution: int, width: int, arch: str) -> tuple[int, list[int]]:
    """(smallest resolution, channels per stage from the smallest to the largest hidden map) of a
    network ``arch`` that halves the resolution per stage down to 4..7."""
    stages, base = 0, resolution
    while base > 7 and base % 2 == 0:
        base, stages = base // 2, stages + 1
    if not 4 <= base <= 7 or stages < 1:
        raise ConfigError(f"data.resolution = {resolution} is not 2^k x (4..7) with k >= 1 "
                          f"(e.g. 28, 32, 64, 128), as the {arch} networks need")
    channels = [min(width * 2 ** (stages - 1 - i), width * 8) for i in range(stages)]
    return base, channels


def _weight_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _inputs_to_weight_dtype(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    dtype = _weight_dtype(module)
    if dtype == torch.float32:
        return None
    return _cast(args, dtype), {key: _cast(value, dtype) for key, value in kwargs.items()}


def _outputs_to_fp32(module: nn.Module, args: tuple, output: Any) -> Any:
    return None if _weight_dtype(module) == torch.float32 else _cast(output, torch.float32)


def accept_fp32_io(module: nn.Module) -> nn.Module:
    """Let ``module`` take and give fp32 tensors whatever its weights' dtype, in place.

    DeepSpeed's bf16/fp16 modes cast the weights themselves (autocast does not); then floating
    inputs (z, images, the penalty's interpolates) are cast to the weights' dtype on the way in, and
    floating outputs to fp32 on the way out, so losses, penalties and metrics stay in fp32. With fp32
    weights (every other mode) both hooks do nothing.
    """
    module.register_forward_pre_hook(_inputs_to_weight_dtype, with_kwargs=True)
    module.register_forward_hook(_outputs_to_fp32)
    return module
