"""R3GAN's generator and discriminator (Huang et al., "The GAN is dead; long live the GAN! A Modern GAN
Baseline", NeurIPS 2024): a plain modern ResNet with no normalisation, no mapping network and no
style modulation.

- Residual blocks are 1-3-1 inverted bottlenecks: a 1x1 conv widens by ``expansion``, a grouped 3x3
  conv (``group_size`` channels per group) mixes space, a 1x1 conv narrows back; a bias and leaky
  ReLU (0.2) after each of the first two. No normalisation layer anywhere.
- Fix-up initialisation: weights N(0, gain / sqrt(fan_in)) (MSR), the branch's gain scaled by
  L^(-1/4) for L blocks in the net, and the branch's last conv zeroed, so every block starts as the
  identity and the net's variance does not grow with depth.
- Resampling between stages is bilinear: a fixed [1, 3, 3, 1] filter, depthwise, with a 1x1 conv
  where the width changes (before the upsampling in G, after the downsampling in D).
- G starts from a learned ``base`` x ``base`` basis, one map per channel, scaled per sample by a
  linear function of z (and, when conditional, a class embedding joined to z); a 1x1 conv makes the
  image (no tanh). D starts with a 1x1 conv from the image and ends with a depthwise ``base`` x
  ``base`` conv (the basis projection) and a linear layer; conditional D projects its last features
  onto a class embedding instead.

Widths per stage (``widths``, smallest map first; empty: ``width`` at every stage up to 32 px, and
above 32 px halved per stage after the fourth, as the paper's FFHQ nets) and blocks per stage
(``blocks``; empty: 2 each) are config values. D uses both lists reversed. Defaults in the shipped
configs are the paper's CIFAR-10 (768 x 4 stages, 2 blocks, groups of 16, expansion 2) and
FFHQ-256 settings.
"""

from __future__ import annotations

import math
from typing import TypeVar, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import ConfigError, NetConfig
from dist_gan.models.base import Discriminator, stage_plan

LEAK = 0.2
LayerT = TypeVar("LayerT", nn.Conv2d, nn.Linear)
LEAKY_RELU_GAIN = math.sqrt(2 / (1 + LEAK ** 2))


def msr_init(layer: LayerT, gain: float = 1.0) -> LayerT:
    """Weights N(0, gain / sqrt(fan_in)), no bias (the activations carry the biases)."""
    fan_in = layer.weight[0].numel()
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
    return layer


def conv(c_in: int, c_out: int, kernel: int, groups: int = 1, gain: float = 1.0) -> nn.Conv2d:
    return msr_init(nn.Conv2d(c_in, c_out, kernel, padding=(kernel - 1) // 2, groups=groups, bias=False),
                    gain)


class BiasedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.to(x.dtype).view(1, -1, 1, 1), LEAK)


class ResidualBlock(nn.Module):
    """x + conv1x1(act(grouped conv3x3(act(conv1x1(x))))), the last conv zeroed at initialisation."""

    def __init__(self, channels: int, expansion: int, group_size: int, total_blocks: int):
        super().__init__()
        wide = channels * expansion
        group_size = min(group_size, wide)  # a group as wide as the layer: a dense 3x3 conv
        if wide % group_size:
            raise ConfigError(f"r3gan: {channels} channels x expansion {expansion} = {wide} is not a multiple "
                              f"of group_size {group_size}")
        gain = LEAKY_RELU_GAIN * total_blocks ** (-1 / 4)  # L^(-1/(2m-2)) for m = 3 layers per branch
        self.widen = conv(channels, wide, 1, gain=gain)
        self.act1 = BiasedLeakyReLU(wide)
        self.mix = conv(wide, wide, 3, groups=wide // group_size, gain=gain)
        self.act2 = BiasedLeakyReLU(wide)
        self.narrow = conv(wide, channels, 1, gain=0.0)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.narrow(self.act2(self.mix(self.act1(self.widen(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def _bilinear_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=dtype, device=device)
    return (taps[:, None] * taps[None, :]) / 64.0


class Upsample(nn.Module):
    """x2 bilinear (a transposed depthwise [1, 3, 3, 1] filter); a 1x1 conv first if the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.project = conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x) if self.project is not None else x
        c = x.shape[1]
        kernel = (4 * _bilinear_kernel(x.dtype, x.device)).expand(c, 1, 4, 4)
        return F.conv_transpose2d(x, kernel, stride=2, padding=1, groups=c)


class Downsample(nn.Module):
    """/2 bilinear (a depthwise [1, 3, 3, 1] filter, stride 2); a 1x1 conv after if the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.project = conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        kernel = _bilinear_kernel(x.dtype, x.device).expand(c, 1, 4, 4)
        x = F.conv2d(x, kernel, stride=2, padding=1, groups=c)
        return self.project(x) if self.project is not None else x


def r3gan_plan(cfg: NetConfig, resolution: int) -> tuple[int, list[int], list[int]]:
    """(basis size, channels per stage, blocks per stage), smallest map first."""
    base, hidden = stage_plan(resolution, 1, "r3gan")
    stages = len(hidden) + 1  # the basis stage, then one per doubling
    widths = list(cfg.widths) or [cfg.width if resolution <= 32 else max(cfg.width >> max(0, i - 3), 1)
                                  for i in range(stages)]
    blocks = list(cfg.blocks) or [2] * stages
    for name, values in (("widths", widths), ("blocks", blocks)):
        if len(values) != stages:
            raise ConfigError(f"r3gan: {name} = {values} has {len(values)} entries; {resolution} px from a "
                              f"{base} px basis has {stages} stages")
    return base, widths, blocks


def _blocks(channels: int, count: int, cfg: NetConfig, total: int) -> list[nn.Module]:
    return [ResidualBlock(channels, cfg.expansion, cfg.group_size, total) for _ in range(count)]


class R3GANGenerator(nn.Module):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int, num_classes: int = 0):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.base, widths, blocks = r3gan_plan(cfg, resolution)
        total = sum(blocks)
        # the class embedding is as wide as z (the paper's CIFAR-10 G: 64 + 64)
        self.embed = msr_init(nn.Linear(num_classes, z_dim, bias=False)) if num_classes else None
        in_dim = z_dim * (2 if num_classes else 1)
        self.basis = nn.Parameter(torch.randn(widths[0], self.base, self.base))
        self.basis_scale = msr_init(nn.Linear(in_dim, widths[0], bias=False))
        layers: list[nn.Module] = _blocks(widths[0], blocks[0], cfg, total)
        for i in range(1, len(widths)):
            layers += [Upsample(widths[i - 1], widths[i]), *_blocks(widths[i], blocks[i], cfg, total)]
        self.body = nn.Sequential(*layers)
        self.to_image = conv(widths[-1], channels, 1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("this generator is class-conditional (model.num_classes > 0): pass labels")
            z = torch.cat([z, self.embed(F.one_hot(labels, self.num_classes).to(z.dtype))], 1)
        x = self.basis[None] * self.basis_scale(z)[:, :, None, None]
        return self.to_image(self.body(x))


class R3GANBody(nn.Module):
    """Image -> features (N, widths[0]): 1x1 conv, stages of blocks and downsampling, the basis projection."""

    def __init__(self, cfg: NetConfig, resolution: int, channels: int):
        super().__init__()
        base, widths, blocks = r3gan_plan(cfg, resolution)
        widths, blocks = widths[::-1], blocks[::-1]  # largest map first
        total = sum(blocks)
        layers: list[nn.Module] = [conv(channels, widths[0], 1)]
        self.stage_ends = []  # where each stage's modules end in ``net`` (Freeze-D's blocks)
        for i in range(len(widths) - 1):
            layers += [*_blocks(widths[i], blocks[i], cfg, total), Downsample(widths[i], widths[i + 1])]
            self.stage_ends.append(len(layers))
        layers += _blocks(widths[-1], blocks[-1], cfg, total)
        self.stage_ends.append(len(layers))
        layers.append(msr_init(nn.Conv2d(widths[-1], widths[-1], base, groups=widths[-1], bias=False)))
        layers.append(nn.Flatten())
        self.net = nn.Sequential(*layers)
        self.features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class R3GANHead(nn.Module):
    """Features -> logit: a linear layer; conditional: a linear map to an embedding space, projected
    onto the class's embedding (the paper's conditional D)."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.linear = msr_init(nn.Linear(features, features if num_classes else 1, bias=False))
        self.embed = (msr_init(nn.Linear(num_classes, features, bias=False), 1 / math.sqrt(features))
                      if num_classes else None)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.linear(h)
        if self.embed is None:
            return out.squeeze(1)
        if labels is None:
            raise ValueError("this discriminator is class-conditional: pass labels")
        return (out * self.embed(F.one_hot(labels, self.num_classes).to(out.dtype))).sum(1)


class R3GANDiscriminator(Discriminator):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int, num_classes: int = 0):
        super().__init__()
        if cfg.mbstd:
            raise ConfigError("r3gan: discriminator.mbstd is not part of R3GAN's D (it has no tricks); "
                              "leave it false")
        self.body = R3GANBody(cfg, resolution, channels)
        self.head = R3GANHead(self.body.features, num_classes)

    def blocks(self) -> list[nn.Module]:
        """Each stage (its residual blocks and the downsampling after them; the first with the 1x1
        input conv), from the input."""
        body = cast(R3GANBody, self.body)
        layers, starts = list(body.net), [0, *body.stage_ends[:-1]]
        return [nn.Sequential(*layers[a:b]) for a, b in zip(starts, body.stage_ends)]
