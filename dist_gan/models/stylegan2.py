"""A StyleGAN2-style generator and residual discriminator (Karras et al. 2020), written from the paper.

G = mapping (z -> w: 2nd-moment normalisation, ``mapping_layers`` fully connected layers at a
learning-rate multiplier of ``mapping_lr_mult``; the running mean ``w_avg`` is tracked for truncation)
+ synthesis (a learned constant at the smallest size, then per resolution two modulated/demodulated
3x3 convolutions with per-pixel noise, and a toRGB whose output is added to the up-sampled image of
the resolutions before: the "skip" architecture). One w per layer (``num_ws``), so style mixing
(``mixing_prob``) switches from one w to another at a random layer during training.

D = fromRGB at full size, one residual block per halving (two 3x3 convs, the second down-sampling;
a 1x1 shortcut; the sum scaled by 1/sqrt(2)), then the minibatch standard deviation, a 3x3 conv, a
fully connected layer and ``DiscriminatorHead`` (the class projection when conditional).

Every weight uses the equalized learning rate: stored N(0, 1) / lr_mult and scaled at run time by
lr_mult / sqrt(fan_in). Channels at resolution r: min(width x resolution / r, 8 x width), so width 64
at 256 px gives StyleGAN2's 512 at 32 px and below. Sizes are 2^k x (4..7) (4, 7: MNIST's 28 px).
Differences from the paper, and why: docs/design.md.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import NetConfig
from dist_gan.models.base import Discriminator, DiscriminatorHead, minibatch_stddev, stage_plan

LRELU_GAIN = math.sqrt(2.0)


def channels_at(size: int, resolution: int, width: int) -> int:
    return min(width * resolution // size, width * 8)


class EqualLinear(nn.Module):
    """Fully connected layer with the equalized learning rate, optionally followed by leaky ReLU
    (times sqrt(2), which keeps the activations' scale)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0,
                 lr_mult: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full((out_features,), bias_init / lr_mult))
        self.weight_gain, self.bias_gain = lr_mult / math.sqrt(in_features), lr_mult
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activate else x


class EqualConv2d(nn.Module):
    """Convolution with the equalized learning rate; ``down``: 2x2 average pooling after it."""

    def __init__(self, c_in: int, c_out: int, kernel: int, bias: bool = True, activate: bool = False,
                 down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(c_in * kernel * kernel)
        self.activate, self.down = activate, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)
        if self.down:
            x = F.avg_pool2d(x, 2)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activate else x


def modulated_weight(weight: torch.Tensor, styles: torch.Tensor, demodulate: bool) -> torch.Tensor:
    """Per-sample weights (N, out, in, k, k): ``weight`` scaled per input channel by each sample's
    style; demodulated, each output channel's weights then have unit L2 norm."""
    w = weight[None] * styles[:, None, :, None, None]
    if demodulate:
        w = w * torch.rsqrt(w.square().sum((2, 3, 4), keepdim=True) + 1e-8)
    return w


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution as one grouped convolution over the batch; ``up``: 2x
    bilinear up-sampling first (the [1, 3, 3, 1] filter of the paper, separable)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, w_dim: int, demodulate: bool = True,
                 up: bool = False):
        super().__init__()
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)  # styles start at 1
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.weight_gain = 1.0 / math.sqrt(c_in * kernel * kernel)
        self.demodulate, self.up = demodulate, up
        self.grouped = True  # False: the unfused form (ONNX has no Conv with a batch-sized group count)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n, c, _, _ = x.shape
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        if not self.grouped:
            return self.unfused(x, self.affine(w))
        weight = modulated_weight(self.weight * self.weight_gain, self.affine(w), self.demodulate)
        out_channels, k = weight.shape[1], weight.shape[-1]
        y = F.conv2d(x.reshape(1, n * c, *x.shape[2:]), weight.reshape(n * out_channels, c, k, k),
                     padding=k // 2, groups=n)
        return y.reshape(n, out_channels, *y.shape[2:])

    def unfused(self, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        """The same result with the styles on the activations and the demodulation on the output (the
        paper's non-fused form): one convolution with the shared weight, any batch size."""
        weight = self.weight * self.weight_gain
        y = F.conv2d(x * styles[:, :, None, None], weight, padding=weight.shape[-1] // 2)
        if self.demodulate:
            scale = (weight[None] * styles[:, None, :, None, None]).square().sum((2, 3, 4)) + 1e-8
            y = y * torch.rsqrt(scale)[:, :, None, None]
        return y


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv, per-pixel noise (learned strength, starts at 0), bias, leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, c_out, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(1))  # not 0-d: DeepSpeed broadcasts 1-d+
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = self.conv(x, w)
        noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        x = x + noise * self.noise_strength + self.bias[None, :, None, None]
        return F.leaky_relu(x, 0.2) * LRELU_GAIN


class ToRGB(nn.Module):
    def __init__(self, c_in: int, channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


class MappingNetwork(nn.Module):
    """z (and the class) -> w; keeps ``w_avg``, the running mean of w in training, for truncation."""

    w_avg: torch.Tensor  # a buffer

    def __init__(self, z_dim: int, w_dim: int, layers: int, lr_mult: float, num_classes: int,
                 w_avg_beta: float = 0.995):
        super().__init__()
        self.embed = nn.Embedding(num_classes, w_dim) if num_classes else None
        dims = [z_dim + (w_dim if num_classes else 0)] + [w_dim] * layers
        self.net = nn.Sequential(*(EqualLinear(a, b, lr_mult=lr_mult, activate=True)
                                   for a, b in zip(dims, dims[1:])))
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.w_avg_beta = w_avg_beta

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.normalize(z)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this generator is class-conditional (model.num_classes > 0): pass labels")
            x = torch.cat([x, self.normalize(self.embed(labels))], 1)
        w = self.net(x)
        if self.training:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg.float(), self.w_avg_beta))
        return w


def mix_styles(ws: torch.Tensor, other: torch.Tensor, crossover: torch.Tensor) -> torch.Tensor:
    """Style mixing: layers from index ``crossover`` (a 0-d tensor; ``num_ws``: none) on take
    ``other``'s w. Chosen on the device: no host sync."""
    take_other = torch.arange(ws.shape[1], device=ws.device) >= crossover
    return torch.where(take_other[None, :, None], other, ws)


class StyleGAN2Generator(nn.Module):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        self.z_dim, self.w_dim, self.num_classes = z_dim, z_dim, num_classes
        self.mixing_prob = cfg.mixing_prob
        self.base, stages = stage_plan(resolution, 1, "stylegan2")
        sizes = [self.base * 2 ** i for i in range(len(stages) + 1)]
        ch = [channels_at(s, resolution, cfg.width) for s in sizes]
        self.mapping = MappingNetwork(z_dim, self.w_dim, cfg.mapping_layers, cfg.mapping_lr_mult,
                                      num_classes)
        self.const = nn.Parameter(torch.randn(ch[0], self.base, self.base))
        self.first = SynthesisLayer(ch[0], ch[0], self.w_dim)
        self.convs = nn.ModuleList()
        for c_in, c_out in zip(ch, ch[1:]):
            self.convs.append(SynthesisLayer(c_in, c_out, self.w_dim, up=True))
            self.convs.append(SynthesisLayer(c_out, c_out, self.w_dim))
        self.to_rgb = nn.ModuleList(ToRGB(c, channels, self.w_dim) for c in ch)
        self.num_ws = 2 * len(sizes)  # one per conv, plus the last toRGB's

    def synthesis(self, ws: torch.Tensor) -> torch.Tensor:
        """(N, num_ws, w_dim) -> images. Layer i's toRGB shares its w with the next conv, as in the
        paper: block b uses ws[2b - 1], ws[2b] and (toRGB) ws[2b + 1]."""
        x = self.first(self.const.unsqueeze(0).repeat(ws.shape[0], 1, 1, 1), ws[:, 0])
        img = self.to_rgb[0](x, ws[:, 1])
        for b in range(1, len(self.to_rgb)):
            x = self.convs[2 * b - 2](x, ws[:, 2 * b - 1])
            x = self.convs[2 * b - 1](x, ws[:, 2 * b])
            img = F.interpolate(img, scale_factor=2.0, mode="bilinear", align_corners=False)
            img = img + self.to_rgb[b](x, ws[:, 2 * b + 1])
        return img

    def styles(self, z: torch.Tensor, labels: torch.Tensor | None, truncation: float = 1.0) -> torch.Tensor:
        """(N, num_ws, w_dim): w for every layer, style-mixed in training with ``mixing_prob``,
        pulled towards ``w_avg`` by ``truncation`` < 1 (psi)."""
        w = self.mapping(z, labels)
        if truncation != 1.0:
            w = self.mapping.w_avg.to(w.dtype).lerp(w, truncation)
        ws = w[:, None].expand(-1, self.num_ws, -1)
        if self.training and self.mixing_prob > 0:
            other = self.mapping(torch.randn_like(z), labels)[:, None].expand(-1, self.num_ws, -1)
            crossover = torch.randint(1, self.num_ws, (), device=z.device)
            mixed = torch.rand((), device=z.device) < self.mixing_prob
            ws = mix_styles(ws, other, torch.where(mixed, crossover, self.num_ws))
        return ws

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, truncation: float = 1.0,
                return_ws: bool = False):
        ws = self.styles(z, labels, truncation)
        if not return_ws:
            return self.synthesis(ws)
        # What path length differentiates by: fp32 and upstream of the images whatever the weights'
        # dtype (the fp32 output cast of base.accept_fp32_io then leaves it as it is).
        ws = ws.float()
        return self.synthesis(ws.to(self.const.dtype)), ws


class StyleGAN2Body(nn.Module):
    """Images -> (N, F): fromRGB, residual blocks down to the smallest size, minibatch stddev,
    3x3 conv, fully connected."""

    def __init__(self, cfg: NetConfig, resolution: int, channels: int):
        super().__init__()
        base, stages = stage_plan(resolution, 1, "stylegan2")
        sizes = [resolution // 2 ** i for i in range(len(stages) + 1)]  # largest first
        ch = [channels_at(s, resolution, cfg.width) for s in sizes]
        self.from_rgb = EqualConv2d(channels, ch[0], 1, activate=True)
        self.blocks = nn.ModuleList(ResidualBlock(c_in, c_out) for c_in, c_out in zip(ch, ch[1:]))
        self.conv = EqualConv2d(ch[-1] + 1, ch[-1], 3, activate=True)
        self.fc = EqualLinear(ch[-1] * base * base, ch[-1], activate=True)
        self.features = ch[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.from_rgb(x)
        for block in self.blocks:
            h = block(h)
        std = minibatch_stddev(h.flatten(1))[:, :, None, None].expand(-1, 1, *h.shape[2:])
        h = self.conv(torch.cat([h, std], 1))
        return self.fc(h.flatten(1))


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv0 = EqualConv2d(c_in, c_in, 3, activate=True)
        self.conv1 = EqualConv2d(c_in, c_out, 3, activate=True, down=True)
        self.skip = EqualConv2d(c_in, c_out, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) / math.sqrt(2.0)


class StyleGAN2Discriminator(Discriminator):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        self.body = StyleGAN2Body(cfg, resolution, channels)
        # the minibatch stddev is in the body, on the maps, as StyleGAN's
        self.head = DiscriminatorHead(self.body.features, num_classes, mbstd=False)

    def blocks(self) -> list[nn.Module]:
        """fromRGB with the first residual block, then each residual block (StyleGAN2-ADA's b256,
        b128, ...), from the input."""
        body = cast(StyleGAN2Body, self.body)
        return [nn.ModuleList([body.from_rgb, body.blocks[0]]), *body.blocks[1:]]
