"""R3GAN (issue 26): the relativistic pairing objective, R2, penalties that share D's forward, the r3gan
networks, and schedules in images. Unit tests: in-process, seconds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import ConfigError, LossConfig, NetConfig, Ramp, load_config
from dist_gan.losses import R1, R2, GANLoss, LossView, RelativisticPairing, build_loss, r1_penalty
from dist_gan.models.r3gan import R3GANDiscriminator, R3GANGenerator, ResidualBlock

pytestmark = pytest.mark.tier("unit")


class TinyG(nn.Module):
    def __init__(self, z_dim: int = 4):
        super().__init__()
        self.z_dim = z_dim
        self.net = nn.Linear(z_dim, 16)

    def forward(self, z, labels=None):
        return torch.tanh(self.net(z)).view(-1, 1, 4, 4)


class TinyD(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, labels=None, return_features=False):
        logits = self.net(x).squeeze(1)
        return (logits, self.net[1](x.flatten(1))) if return_features else logits


def test_the_pairing_objective_by_hand():
    objective = RelativisticPairing(LossConfig(name="rpgan"))
    real, fake = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.5, 1.0, -1.0])
    # D: softplus(fake_i - real_i); G: softplus(real_i - fake_i); means over the pairs
    d_expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(1.0)) + math.log(2.0)) / 3
    g_expected = (math.log1p(math.exp(1.5)) + math.log1p(math.exp(-1.0)) + math.log(2.0)) / 3
    assert objective.d_loss(real, fake).item() == pytest.approx(d_expected)
    assert objective.g_loss(fake, real).item() == pytest.approx(g_expected)
    # pairs, not all against all: swapping two fakes changes the loss
    assert objective.d_loss(real, fake[[1, 0, 2]]).item() != pytest.approx(d_expected)
    with pytest.raises(ConfigError, match="pairs"):
        objective.d_fake(fake)


def test_rpgan_generator_step_judges_the_reals_without_gradient():
    torch.manual_seed(0)
    G, D = TinyG(), TinyD()
    loss = build_loss(LossConfig(name="rpgan"))
    real = torch.randn(6, 1, 4, 4)
    torch.manual_seed(1)
    value, _ = loss.generator_loss(LossView(G, D, D, D, None, 4, 0), real, torch.zeros(6, dtype=torch.long))
    torch.manual_seed(1)
    z = torch.randn(6, 4)
    expected = F.softplus(D(real) - D(G(z))).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_r2_gradient_matches_finite_differences_on_a_tiny_d():
    """R2 = 0.5 gamma mean ||grad_x D(x)||^2 at fakes; its gradient w.r.t. D's weights checked against
    central differences of the same penalty."""
    torch.manual_seed(0)
    G, D = TinyG(), TinyD().double()
    fake = torch.randn(5, 1, 4, 4, dtype=torch.float64)

    def r2(weights_offset: float = 0.0, index: tuple = (0, 0)) -> torch.Tensor:
        x = fake.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
        return 0.5 * 2.0 * grad.flatten(1).pow(2).sum(1).mean()

    weight = D.net[1].weight
    value = r2()
    (analytic,) = torch.autograd.grad(value, weight)
    eps = 1e-6
    for index in [(0, 0), (3, 7), (7, 15)]:
        with torch.no_grad():
            weight[index] += eps
        up = r2().item()
        with torch.no_grad():
            weight[index] -= 2 * eps
        down = r2().item()
        with torch.no_grad():
            weight[index] += eps
        assert analytic[index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)
    # the term computes the same penalty from the loss's own forward
    loss = GANLoss(LossConfig(name="rpgan", r2_gamma=2.0))
    D32, real = TinyD(), torch.randn(5, 1, 4, 4)
    torch.manual_seed(3)
    _, stats = loss.discriminator_loss(LossView(G, D32, D32, D32, None, 4, 0), real,
                                       torch.zeros(5, dtype=torch.long))
    torch.manual_seed(3)
    fakes = G(torch.randn(5, 4)).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D32(fakes).sum(), fakes)
    assert stats["r2"].item() == pytest.approx((0.5 * 2.0 * g.flatten(1).pow(2).sum(1).mean()).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["ns", "rpgan", "hinge"])
def test_a_shared_forward_gives_the_gradients_of_separate_forwards(name):
    """D's gradient with R1 (and R2) from the loss's own logits equals the gradient of the objective
    on one forward plus each penalty on a second forward of its own (the old way)."""
    torch.manual_seed(0)
    G, D = TinyG(), TinyD()
    real = torch.randn(6, 1, 4, 4)
    labels = torch.zeros(6, dtype=torch.long)
    cfg = LossConfig(name=name, r1_gamma=1.5, r2_gamma=0.5 if name == "rpgan" else 0.0)
    torch.manual_seed(1)
    shared, _ = GANLoss(cfg).discriminator_loss(LossView(G, D, D, D, None, 4, 0), real, labels)
    D.zero_grad()
    shared.backward()
    got = [p.grad.clone() for p in D.parameters()]

    torch.manual_seed(1)
    fake = G(torch.randn(6, 4)).detach()
    objective = GANLoss(cfg).objective
    separate = objective.d_loss(D(real), D(fake)) + 0.5 * cfg.r1_gamma * r1_penalty(D, real)
    if cfg.r2_gamma:
        separate = separate + 0.5 * cfg.r2_gamma * r1_penalty(D, fake)  # R2 is R1's formula at fakes
    D.zero_grad()
    separate.backward()
    for a, b in zip(got, (p.grad for p in D.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the loss's own switch (speed.share_penalty_forward=false) is that separate computation
    torch.manual_seed(1)
    unshared, _ = GANLoss(cfg, share_forward=False).discriminator_loss(LossView(G, D, D, D, None, 4, 0), real, labels)
    D.zero_grad()
    unshared.backward()
    for a, b in zip(got, (p.grad for p in D.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_r1_and_r2_are_terms_with_their_own_intervals():
    loss = build_loss(LossConfig(name="rpgan", r1_gamma=1.0, r2_gamma=1.0, r1_every=2, r2_every=3))
    assert isinstance(loss.terms["r1"], R1) and isinstance(loss.terms["r2"], R2)
    G, D = TinyG(), TinyD()
    seen = []
    for _ in range(6):
        _, stats = loss.discriminator_loss(LossView(G, D, D, D, None, 4, 0), torch.randn(4, 1, 4, 4),
                                           torch.zeros(4, dtype=torch.long))
        loss.after_discriminator_step(D)
        seen.append(("r1" in stats, "r2" in stats))
    assert seen == [(True, True), (False, False), (True, False), (False, True), (True, False), (False, False)]


CASES = [(res, ch, nc) for res in (16, 32, 64, 256) for ch in (1, 3) for nc in (0, 10)
         if res != 256 or (ch, nc) in ((3, 0), (1, 10))]


@pytest.mark.parametrize("resolution,channels,num_classes", CASES)
def test_r3gan_networks_build_run_and_start_as_fixup(resolution, channels, num_classes):
    """Forward and backward at 16-256 px, 1 or 3 channels, conditional or not; every residual branch
    outputs exactly zero at initialisation (its last conv is zeroed)."""
    torch.manual_seed(0)
    stages = int(math.log2(resolution)) - 1
    cfg = NetConfig(arch="r3gan", widths=[32] * min(stages, 4) + [16] * max(stages - 4, 0),
                    blocks=[1] * stages, group_size=16, expansion=2)
    G = R3GANGenerator(cfg, 8, resolution, channels, num_classes)
    D = R3GANDiscriminator(cfg, 8, resolution, channels, num_classes)
    labels = torch.randint(0, num_classes, (2,)) if num_classes else None
    images = G(torch.randn(2, 8), labels)
    assert images.shape == (2, channels, resolution, resolution)
    logits, features = D(images, labels, return_features=True)
    assert logits.shape == (2,) and features.shape[0] == 2
    logits.sum().backward()
    assert all(p.grad is not None for p in G.parameters()) and all(p.grad is not None for p in D.parameters())
    for block in [m for net in (G, D) for m in net.modules() if isinstance(m, ResidualBlock)]:
        x = torch.randn(1, block.widen.in_channels, 4, 4)
        assert torch.count_nonzero(block.branch(x)) == 0
        assert torch.equal(block(x), x)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d))
                   for net in (G, D) for m in net.modules())


def test_r3gan_grouped_convs_and_defaults():
    G = R3GANGenerator(NetConfig(arch="r3gan", width=768), 64, 32, 3, 10)  # the paper's CIFAR-10 G
    blocks = [m for m in G.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 8 and blocks[0].mix.groups == 1536 // 16 and blocks[0].mix.in_channels == 1536
    D = R3GANDiscriminator(NetConfig(arch="r3gan", width=768), 64, 256, 3)  # FFHQ-256: 7 stages
    assert D.body.features == 768
    assert sum(isinstance(m, ResidualBlock) for m in D.modules()) == 14
    with pytest.raises(ConfigError, match="widths"):
        R3GANGenerator(NetConfig(arch="r3gan", widths=[8, 8]), 8, 32, 3)


def test_ramps_are_cosine_or_linear_over_kimg_and_hold_their_end():
    cosine, linear = Ramp(2.0, 1.0, 10.0, "cosine"), Ramp(2.0, 1.0, 10.0, "linear")
    assert cosine.at(0) == 2.0 and cosine.at(5) == pytest.approx(1.5) and cosine.at(10) == 1.0
    assert cosine.at(2.5) == pytest.approx(2.0 - 0.5 * (1 - math.cos(math.pi / 4)))
    assert linear.at(2.5) == pytest.approx(1.75) and linear.at(50) == 1.0


def test_schedule_config_is_validated():
    with pytest.raises(ConfigError, match="schedule.r1_gamma"):
        load_config(None, {"schedule.r1_gamma": {"start": 1, "end": 0.1, "kimg": 5}})
    with pytest.raises(ConfigError, match="kimg"):
        load_config(None, {"loss.r1_gamma": 1, "schedule.r1_gamma": {"start": 1, "end": 0.1, "kimg": 0}})
    with pytest.raises(ConfigError, match="augment_p"):
        load_config(None, {"schedule.augment_p": {"start": 0, "end": 0.5, "kimg": 5}})
    with pytest.raises(ConfigError, match="unknown config key 'schedule.r1_gama'"):
        load_config(None, {"schedule.r1_gama": {"start": 1}})
    config = load_config("configs/cifar10_r3gan.yaml")
    assert config.schedule.beta2.at(20000) == pytest.approx(0.99)


def test_schedules_set_gamma_beta2_and_p_and_the_lr_follows_its_ramp():
    """In a real (one-process) trainer's objects: values are a function of the step alone."""
    from dist_gan.config import AugmentConfig, ScheduleConfig
    from dist_gan.models.augment import build_augmentation
    from dist_gan.run.nets import build_schedule
    from dist_gan.run.schedules import build_schedules

    loss = build_loss(LossConfig(name="rpgan", r1_gamma=1.0, r2_gamma=1.0))
    D = TinyD()
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.9))
    augment = build_augmentation(AugmentConfig(kind="ada", target=None))
    cfg = ScheduleConfig(r1_gamma=Ramp(1.0, 0.1, 1.0), beta2=Ramp(0.9, 0.99, 1.0),
                         augment_p=Ramp(0.0, 0.5, 1.0, "linear"))
    schedules = build_schedules(cfg, 100, loss, {"G": [], "D": [opt]}, augment)
    values = schedules.apply(5)  # 0.5 kimg
    assert values["r1_gamma"] == pytest.approx(0.55) and loss.terms["r1"].gamma == pytest.approx(0.55)
    assert loss.terms["r2"].gamma == 1.0  # not ramped
    assert opt.param_groups[0]["betas"] == (0.0, pytest.approx(0.945))
    assert augment.p == pytest.approx(0.25)
    from dist_gan.config import OptimConfig

    scheduler = build_schedule(opt, OptimConfig(), 100, Ramp(2e-4, 5e-5, 1.0), 1e-3, 0.1)
    assert scheduler.get_last_lr()[0] == pytest.approx(2e-4)
    for _ in range(10):
        opt.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(5e-5)
