"""ResNet generator and discriminator of SNGAN (Miyato et al. 2018) and BigGAN (Brock et al. 2019).

G: z (and, when conditional, the class) -> a ``base`` x ``base`` map -> one up-sampling residual
block per doubling -> BN, ReLU, 3x3 conv, tanh. D: one down-sampling residual block per halving
(the first one "optimized": conv before the activation), then a block at the smallest size, ReLU,
a sum over positions and ``DiscriminatorHead`` (linear, plus the class projection when conditional).

Channels: ``width`` x a multiplier per block, listed from the smallest map to the largest
(``channel_mult``; BigGAN's ``ch x arch[...]``). Empty picks: 4 everywhere up to 32 px (SNGAN's
CIFAR nets at width 64: 256 channels) and BigGAN's halving plan above (16, 16, 8, 4, 2, 1 at
128 px). D uses the same list reversed. ``attention_res``: a SAGAN self-attention block after the
block whose output has that resolution (both nets).

Conditional G (``num_classes > 0``), as BigGAN: a shared class embedding, joined to one chunk of z
per block (hierarchical latents), sets the gain and bias of every batch norm.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import ConfigError, NetConfig
from dist_gan.models.base import Discriminator, DiscriminatorHead, stage_plan
from dist_gan.models.layers import SelfAttention, add_spectral_norm, init_weights


def channel_plan(cfg: NetConfig, resolution: int) -> tuple[int, list[int]]:
    """(smallest map size, channels of each block's output from the smallest map to the largest)."""
    base, stages = stage_plan(resolution, 1, "resnet")
    blocks = len(stages)
    if cfg.channel_mult:
        if len(cfg.channel_mult) != blocks:
            raise ConfigError(f"channel_mult = {list(cfg.channel_mult)} has {len(cfg.channel_mult)} "
                              f"entries; {resolution} px from {base} px needs {blocks} (one per doubling)")
        mult = list(cfg.channel_mult)
    elif resolution <= 32:
        mult = [4] * blocks
    else:
        mult = [min(16, 2 ** (blocks - i)) for i in range(blocks)]
    return base, [cfg.width * m for m in mult]


class ConditionalBatchNorm(nn.Module):
    """Batch norm whose gain (1 + ...) and bias are linear in a conditioning vector; a plain affine
    batch norm when there is none (``cond_dim == 0``)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=cond_dim == 0)
        self.gain = nn.Linear(cond_dim, channels, bias=False) if cond_dim else None
        self.bias = nn.Linear(cond_dim, channels, bias=False) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(x)
        if self.gain is None or self.bias is None or cond is None:
            return h
        return h * (1 + self.gain(cond))[:, :, None, None] + self.bias(cond)[:, :, None, None]


class UpBlock(nn.Module):
    """BN, ReLU, 2x nearest up-sampling, 3x3 conv, BN, ReLU, 3x3 conv; the shortcut up-samples and
    maps channels with a 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int):
        super().__init__()
        self.bn1, self.bn2 = ConditionalBatchNorm(c_in, cond_dim), ConditionalBatchNorm(c_out, cond_dim)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, cond)), scale_factor=2.0)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), cond)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2.0))


class DownBlock(nn.Module):
    """(ReLU,) 3x3 conv, ReLU, 3x3 conv, 2x2 average pooling; the shortcut maps channels with a 1x1
    conv and pools. ``first``: SNGAN's optimized block, no activation before the first conv (on
    images) and the shortcut pools before its conv. ``down=False``: the block at the smallest size."""

    def __init__(self, c_in: int, c_out: int, first: bool = False, down: bool = True):
        super().__init__()
        self.first, self.down = first, down
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if (c_in != c_out or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.down:
            h = F.avg_pool2d(h, 2)
        skip = x
        if self.first:
            assert self.shortcut is not None  # a first block always changes the channels
            skip = self.shortcut(F.avg_pool2d(x, 2))
        else:
            if self.shortcut is not None:
                skip = self.shortcut(skip)
            if self.down:
                skip = F.avg_pool2d(skip, 2)
        return h + skip


class ResNetGenerator(nn.Module):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.base, widths = channel_plan(cfg, resolution)
        blocks = len(widths)
        first = widths[0] if cfg.channel_mult or resolution <= 32 else cfg.width * 16
        if num_classes:
            # hierarchical latents: z in (blocks + 1) chunks, one for the input layer, one per block
            self.chunk = z_dim // (blocks + 1)
            if self.chunk < 1:
                raise ConfigError(f"model.z_dim = {z_dim} is too small to split over {blocks + 1} chunks "
                                  "(hierarchical latents of a conditional resnet generator)")
            self.shared: nn.Embedding | None = nn.Embedding(num_classes, cfg.shared_dim)
            cond_dim = self.chunk + cfg.shared_dim
            project_in = z_dim - blocks * self.chunk
        else:
            self.chunk, cond_dim, project_in = 0, 0, z_dim
            self.shared = None
        self.project = nn.Linear(project_in, first * self.base * self.base)
        self.first_channels = first
        ins = [first, *widths[:-1]]
        self.blocks = nn.ModuleList(UpBlock(c_in, c_out, cond_dim) for c_in, c_out in zip(ins, widths))
        sizes = [self.base * 2 ** (i + 1) for i in range(blocks)]
        self.attention = nn.ModuleDict({str(i): SelfAttention(widths[i]) for i in range(blocks)
                                        if sizes[i] == cfg.attention_res})
        if cfg.attention_res and not self.attention:
            raise ConfigError(f"attention_res = {cfg.attention_res} is not a block output size of this "
                              f"generator ({sizes})")
        self.out = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(),
                                 nn.Conv2d(widths[-1], channels, 3, 1, 1), nn.Tanh())
        init_weights(self, cfg.init)
        if cfg.spectral_norm:
            add_spectral_norm(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.shared is not None:
            if labels is None:
                raise ValueError("this generator is class-conditional (model.num_classes > 0): pass labels")
            chunks = z.split([z.shape[1] - len(self.blocks) * self.chunk] + [self.chunk] * len(self.blocks), 1)
            z, embedding = chunks[0], self.shared(labels)
            conds: list[torch.Tensor | None] = [torch.cat([c, embedding], 1) for c in chunks[1:]]
        else:
            conds = [None] * len(self.blocks)
        h = self.project(z).view(z.shape[0], self.first_channels, self.base, self.base)
        for i, (block, cond) in enumerate(zip(self.blocks, conds)):
            h = block(h, cond)
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        return self.out(h)


class ResNetBody(nn.Module):
    """Images -> (N, F) features: the residual down-sampling stack, ReLU, sum over positions."""

    def __init__(self, cfg: NetConfig, resolution: int, channels: int):
        super().__init__()
        _, widths = channel_plan(cfg, resolution)
        widths = widths[::-1]  # largest map first
        sizes = [resolution // 2 ** (i + 1) for i in range(len(widths))]  # output size of each block
        self.blocks = nn.ModuleList([DownBlock(channels, widths[0], first=True)])
        self.blocks.extend(DownBlock(c_in, c_out) for c_in, c_out in zip(widths, widths[1:]))
        self.blocks.append(DownBlock(widths[-1], widths[-1], down=False))
        self.attention = nn.ModuleDict({str(i): SelfAttention(widths[i]) for i in range(len(widths))
                                        if sizes[i] == cfg.attention_res})
        if cfg.attention_res and not self.attention:
            raise ConfigError(f"attention_res = {cfg.attention_res} is not a block output size of this "
                              f"discriminator ({sizes})")
        self.features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        return F.relu(h).sum((2, 3))


class ResNetDiscriminator(Discriminator):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        self.body = ResNetBody(cfg, resolution, channels)
        self.head = head = DiscriminatorHead(self.body.features, num_classes, cfg.mbstd)
        init_weights(self, cfg.init)
        if head.embed is not None:  # small, as Miyato & Koyama's (see DiscriminatorHead)
            nn.init.xavier_uniform_(head.embed.weight)
        if cfg.spectral_norm:
            add_spectral_norm(self)

    def blocks(self) -> list[nn.Module]:
        """Each residual block (with the self-attention after it, if any), from the input."""
        body = cast(ResNetBody, self.body)
        return [nn.ModuleList([block, *([body.attention[str(k)]] if str(k) in body.attention else [])])
                for k, block in enumerate(body.blocks)]
