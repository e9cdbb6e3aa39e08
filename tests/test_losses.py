"""Losses and penalties against values computed by hand."""

import math

import pytest
import torch
import torch.nn as nn

from dist_gan.config import LossConfig
from dist_gan.losses import LOSSES, build_loss, gradient_penalty, r1_penalty


class Linear(nn.Module):
    """D(x) = w . x: its input gradient is w everywhere, so penalties have closed forms."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return x.flatten(1) @ self.w


def test_gradient_penalty_by_hand():
    d = Linear([3.0, 4.0])  # ||w|| = 5  ->  (5 - 1)^2 = 16
    real, fake = torch.randn(8, 2), torch.randn(8, 2)
    gp = gradient_penalty(d, real, fake)
    assert gp.item() == pytest.approx(16.0)
    gp.backward()  # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w|| = 8 * (0.6, 0.8)
    assert d.w.grad.tolist() == pytest.approx([4.8, 6.4])


def test_gradient_penalty_of_a_unit_lipschitz_critic_is_zero():
    d = Linear([0.6, 0.8])
    assert gradient_penalty(d, torch.randn(4, 2), torch.randn(4, 2)).item() == pytest.approx(0.0, abs=1e-12)


def test_r1_by_hand():
    d = Linear([1.0, 2.0])  # ||grad||^2 = 5
    assert r1_penalty(d, torch.randn(4, 2)).item() == pytest.approx(5.0)
    loss = build_loss(LossConfig(name="ns", r1_gamma=2.0))
    _, stats = loss.discriminator_loss(d, torch.randn(4, 2), torch.randn(4, 2))
    assert stats["r1"].item() == pytest.approx(0.5 * 2.0 * 5.0)


def test_wgan_gp_total_is_wasserstein_plus_weighted_penalty():
    d = Linear([3.0, 4.0])
    real, fake = torch.ones(4, 2), torch.zeros(4, 2)  # D(real) = 7, D(fake) = 0
    loss, stats = build_loss(LossConfig(name="wgan_gp", gp_weight=10.0)).discriminator_loss(d, real, fake)
    assert stats["wasserstein"].item() == pytest.approx(7.0)
    assert loss.item() == pytest.approx(-7.0 + 10.0 * 16.0)


def test_penalty_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    d = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    real, fake = torch.randn(4, 16), torch.randn(4, 16)
    torch.manual_seed(1)
    reference = gradient_penalty(d, real, fake)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = gradient_penalty(d, real, fake)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == reference.item()


@pytest.mark.parametrize("name,real,fake,d_expected,g_expected", [
    ("ns", 0.0, 0.0, 2 * math.log(2), math.log(2)),
    ("wgan", 2.0, -1.0, -3.0, 1.0),
    ("hinge", 0.5, -0.5, 0.5 + 0.5, 0.5),
])
def test_objectives_on_known_logits(name, real, fake, d_expected, g_expected):
    loss = LOSSES[name](LossConfig(name=name))
    r, f = torch.full((3,), real), torch.full((3,), fake)
    assert loss.d_objective(r, f).item() == pytest.approx(d_expected)
    assert loss.g_objective(f).item() == pytest.approx(g_expected)


def test_weight_clipping_only_for_wgan():
    for name, expected in (("wgan", [0.01, -0.01]), ("wgan_gp", [3.0, -4.0]), ("hinge", [3.0, -4.0])):
        d = Linear([3.0, -4.0])
        build_loss(LossConfig(name=name, clip_value=0.01)).after_discriminator_step(d)
        assert d.w.tolist() == pytest.approx(expected)
