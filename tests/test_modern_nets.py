"""The ResNet (SNGAN/BigGAN) and StyleGAN2 networks (issue 16): shapes at every resolution, the
StyleGAN2 pieces against hand-computed cases, lazy R1, path length, truncation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from dist_gan.config import ConfigError, LossConfig, NetConfig, load_config
from dist_gan.losses import GANLoss, LossView, PathLength, r1_penalty
from dist_gan.models import build_discriminator, build_generator
from dist_gan.models.resnet import ResNetGenerator, channel_plan
from dist_gan.models.sampling import decode, truncate_latents
from dist_gan.models.stylegan2 import (
    EqualConv2d,
    EqualLinear,
    MappingNetwork,
    ModulatedConv2d,
    StyleGAN2Generator,
    mix_styles,
    modulated_weight,
)

pytestmark = pytest.mark.tier("unit")


def nets(arch: str, resolution: int, channels: int, num_classes: int = 0, width: int = 4, **net):
    overrides = {"model.generator.arch": arch, "model.discriminator.arch": arch,
                 "model.generator.width": width, "model.discriminator.width": width,
                 "model.discriminator.norm": "none", "model.discriminator.spectral_norm": arch == "resnet",
                 "model.num_classes": num_classes, "model.z_dim": 32,
                 "data.resolution": resolution, "data.channels": channels}
    overrides.update({f"model.generator.{k}": v for k, v in net.items()})
    overrides.update({f"model.discriminator.{k}": v for k, v in net.items()})
    config = load_config(None, overrides)
    return build_generator(config), build_discriminator(config)


@pytest.mark.parametrize("arch", ["resnet", "stylegan2"])
@pytest.mark.parametrize("resolution,channels", [(28, 1), (32, 3), (64, 3), (128, 3), (256, 3)])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_shapes_forward_backward(arch, resolution, channels, num_classes):
    torch.manual_seed(0)
    G, D = nets(arch, resolution, channels, num_classes, width=2 if resolution >= 128 else 4)
    z = torch.randn(4, 32)
    labels = torch.randint(0, 10, (4,)) if num_classes else None
    images = G(z, labels)
    assert images.shape == (4, channels, resolution, resolution)
    assert images.abs().max() <= 1.0 if arch == "resnet" else torch.isfinite(images).all()
    logits = D(images, labels)
    assert logits.shape == (4,)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in G.parameters() if p.requires_grad), "a generator parameter got no gradient"
    if num_classes:  # the label changes what both networks do
        other = (labels + 1) % 10
        with torch.no_grad():
            G.eval()
            assert not torch.allclose(G(z, labels), G(z, other))
            assert not torch.allclose(D(images, labels), D(images, other))


@pytest.mark.parametrize("arch", ["resnet", "stylegan2"])
def test_bf16_autocast(arch):
    G, D = nets(arch, 32, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = G(torch.randn(4, 32))
        logits = D(images)
    logits.float().sum().backward()
    assert torch.isfinite(logits.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)


def test_resnet_channel_plan_and_attention():
    assert channel_plan(NetConfig(width=64), 32) == (4, [256, 256, 256])  # SNGAN's CIFAR nets
    assert channel_plan(NetConfig(width=64), 128)[1] == [64 * m for m in (16, 16, 8, 4, 2)]
    assert channel_plan(NetConfig(width=8, channel_mult=[4, 2]), 28) == (7, [32, 16])
    with pytest.raises(ConfigError, match="needs 3"):
        channel_plan(NetConfig(width=8, channel_mult=[4, 2]), 32)
    G, D = nets("resnet", 64, 3, attention_res=32)
    assert len(G.attention) == 1 and len(D.body.attention) == 1
    with pytest.raises(ConfigError, match="attention_res = 12"):
        nets("resnet", 64, 3, attention_res=12)


def test_resnet_orthogonal_init():
    G = ResNetGenerator(NetConfig(width=4, init="orthogonal"), 32, 32, 3)
    w = G.project.weight  # (out, in) with out > in: orthonormal columns
    assert torch.allclose(w.T @ w, torch.eye(w.shape[1]), atol=1e-5)


def test_conditional_resnet_uses_hierarchical_latents():
    G = ResNetGenerator(NetConfig(width=4), 32, 32, 3, num_classes=10)
    G.eval()
    z, labels = torch.randn(2, 32), torch.tensor([1, 2])
    blocks = len(G.blocks)
    changed = z.clone()
    changed[:, -G.chunk:] += 1.0  # only the last block's chunk
    with torch.no_grad():
        assert not torch.allclose(G(z, labels), G(changed, labels))
    assert G.project.in_features == 32 - blocks * G.chunk


# --- StyleGAN2 pieces, by hand ---------------------------------------------------------------------

def test_equalized_learning_rate_scales_by_inverse_sqrt_fan_in():
    layer = EqualLinear(16, 3)
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x), x @ (layer.weight / 4.0).T + layer.bias, atol=1e-6)
    torch.manual_seed(0)
    slow = EqualLinear(256, 64, lr_mult=0.01)  # stored 100x larger, scaled back at run time
    assert abs(float(slow.weight.detach().std()) - 100.0) < 5.0
    assert math.isclose(slow.weight_gain, 0.01 / 16.0)
    conv = EqualConv2d(3, 2, 3)
    assert math.isclose(conv.weight_gain, 1 / math.sqrt(27))
    y = conv(torch.ones(1, 3, 5, 5))
    expected = torch.nn.functional.conv2d(torch.ones(1, 3, 5, 5), conv.weight / math.sqrt(27), conv.bias, padding=1)
    assert torch.allclose(y, expected, atol=1e-6)


def test_demodulation_gives_each_output_channel_unit_norm():
    weight, styles = torch.randn(6, 4, 3, 3), torch.rand(2, 4) * 3
    w = modulated_weight(weight, styles, demodulate=True)
    assert torch.allclose(w.square().sum((2, 3, 4)), torch.ones(2, 6), atol=1e-5)
    raw = modulated_weight(weight, styles, demodulate=False)
    assert torch.allclose(raw[1, :, 2], weight[:, 2] * styles[1, 2])
    conv = ModulatedConv2d(4, 6, 3, w_dim=8)  # the grouped conv equals a per-sample conv
    x, wv = torch.randn(2, 4, 5, 5), torch.randn(2, 8)
    per_sample = modulated_weight(conv.weight * conv.weight_gain, conv.affine(wv), True)
    expected = torch.stack([torch.nn.functional.conv2d(x[i:i + 1], per_sample[i], padding=1)[0]
                            for i in range(2)])
    assert torch.allclose(conv(x, wv), expected, atol=1e-5)


def test_w_avg_tracks_the_mean_of_w_in_training_only():
    mapping = MappingNetwork(8, 8, 2, 0.01, num_classes=0, w_avg_beta=0.5)
    z = torch.randn(16, 8)
    w = mapping(z, None)
    assert torch.allclose(mapping.w_avg, w.mean(0) * 0.5, atol=1e-6)  # lerp from 0 by 1 - beta
    w2 = mapping(z, None)
    assert torch.allclose(mapping.w_avg, w.mean(0) * 0.5 + (w2.mean(0) - w.mean(0) * 0.5) * 0.5, atol=1e-6)
    before = mapping.w_avg.clone()
    mapping.eval()
    mapping(torch.randn(16, 8), None)
    assert torch.equal(mapping.w_avg, before)


def test_style_mixing_switches_w_at_the_crossover_index():
    ws, other = torch.zeros(2, 6, 3), torch.ones(2, 6, 3)
    mixed = mix_styles(ws, other, torch.tensor(4))
    assert torch.equal(mixed[:, :4], ws[:, :4]) and torch.equal(mixed[:, 4:], other[:, 4:])
    assert torch.equal(mix_styles(ws, other, torch.tensor(6)), ws)  # no mixing
    G = StyleGAN2Generator(NetConfig(width=4, mixing_prob=1.0, mapping_layers=2), 8, 16, 1)
    torch.manual_seed(3)
    ws = G.styles(torch.randn(2, 8), None)
    changes = [i for i in range(1, G.num_ws) if not torch.equal(ws[:, i], ws[:, i - 1])]
    assert len(changes) == 1  # exactly one crossover in training with mixing_prob 1
    G.eval()
    ws = G.styles(torch.randn(2, 8), None)
    assert all(torch.equal(ws[:, i], ws[:, 0]) for i in range(G.num_ws))


def test_truncation_pulls_w_towards_its_average_and_truncates_z():
    G = StyleGAN2Generator(NetConfig(width=4, mapping_layers=2), 8, 16, 1).eval()
    G.mapping.w_avg.fill_(0.5)
    z = torch.randn(3, 8)
    w = G.mapping(z, None)
    assert torch.allclose(G.styles(z, None, truncation=0.0 + 1e-9)[:, 0], torch.full_like(w, 0.5), atol=1e-6)
    assert torch.allclose(G.styles(z, None, truncation=0.7)[:, 0], 0.5 + 0.7 * (w - 0.5), atol=1e-6)
    t = truncate_latents(torch.randn(1000, 8) * 3, 0.5)
    assert t.abs().max() <= 0.5
    a = decode(G, z, 3, "cpu", truncation=0.7)
    assert a.shape == (3, 1, 16, 16)
    with pytest.raises(ConfigError, match="must be a finite number > 0"):
        decode(G, z, 3, "cpu", truncation=0.0)


# --- regularisation ---------------------------------------------------------------------------------

class TinyD(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 1)

    def forward(self, x, labels=None, return_features=False):
        h = torch.tanh(self.conv(x)).flatten(1)
        out = self.fc(h).squeeze(1)
        return (out, h) if return_features else out


class TinyG(nn.Module):
    z_dim = 4

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 64)

    def forward(self, z, labels=None):
        return torch.tanh(self.fc(z)).view(-1, 1, 8, 8)


def test_lazy_r1_at_interval_k_is_k_times_r1_on_every_kth_update():
    torch.manual_seed(0)
    G, D = TinyG(), TinyD()
    models = LossView(G, D, D, D, None, 4, 0)
    real = torch.randn(6, 1, 8, 8)
    k = 4

    def grads(every: int, updates: int) -> list[torch.Tensor]:
        loss = GANLoss(LossConfig(name="ns", r1_gamma=2.0, r1_every=every))
        loss.updates["D"] = updates
        torch.manual_seed(1)
        value, stats = loss.discriminator_loss(models, real, torch.zeros(6, dtype=torch.long))
        D.zero_grad()
        value.backward()
        return [p.grad.clone() for p in D.parameters()], stats

    lazy, stats = grads(k, 0)  # due
    plain, _ = grads(1, 0)
    base, _ = grads(k, 1)  # not due: the objective alone
    assert "r1" in stats
    r1_grads = [p - b for p, b in zip(plain, base)]
    for got, b, r in zip(lazy, base, r1_grads):
        assert torch.allclose(got, b + k * r, atol=1e-6)
    # and R1 itself: (gamma / 2) mean ||grad_x D||^2
    x = real.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(D(x).sum(), x)
    assert torch.allclose(r1_penalty(D, real), g.flatten(1).pow(2).sum(1).mean(), atol=1e-6)


def test_path_length_term_moves_its_mean_and_round_trips():
    G = StyleGAN2Generator(NetConfig(width=4, mapping_layers=2, mixing_prob=0.0), 8, 16, 1)
    models = LossView(G, None, None, None, None, 8, 0, G_penalty=G)
    term = PathLength(LossConfig(pl_weight=2.0, pl_decay=0.5))

    class Step:
        pass

    step = Step()
    step.models, step.real = models, torch.zeros(8, 1, 16, 16)
    value, stats = term.generator(step)
    assert value.requires_grad and float(term.mean) > 0
    value.backward()
    assert G.mapping.net[0].weight.grad is not None  # reaches the mapping through w
    first = float(term.mean)
    term.generator(step)
    assert float(term.mean) != first
    restored = PathLength(LossConfig(pl_weight=2.0))
    restored.load_state_dict(term.state_dict())
    assert torch.equal(restored.mean, term.mean)


def test_path_length_needs_a_w_space():
    with pytest.raises(ConfigError, match="pl_weight"):
        load_config(None, {"loss.pl_weight": 2.0})
    with pytest.raises(ConfigError, match="keep_best"):
        load_config(None, {"run.keep_best": True})
