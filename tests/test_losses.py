"""Losses and penalties against values computed by hand."""

import math

import pytest
import torch
import torch.nn as nn

from dist_gan.config import LossConfig
from dist_gan.losses import HistoricalAverage, LossView, build_loss, gradient_penalty, r1_penalty

pytestmark = pytest.mark.tier("unit")


class Linear(nn.Module):
    """D(x) = w . x: its input gradient is w everywhere, so penalties have closed forms. Its
    "features" are x itself."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x, labels=None, return_features=False):
        logits = x.flatten(1) @ self.w
        return (logits, x.flatten(1)) if return_features else logits


class Constant(nn.Module):
    """A generator that always produces ``images`` (a batch), whatever z."""

    def __init__(self, images):
        super().__init__()
        self.images = images
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, z, labels=None):
        return self.images * self.scale


def models(d, fake, encoder=None):
    return LossView(G=Constant(fake), D=d, D_plain=d, D_penalty=d, E=encoder, z_dim=3, num_classes=0)


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
    _, stats = loss.discriminator_loss(models(d, torch.randn(4, 2)), torch.randn(4, 2), torch.zeros(4))
    assert stats["r1"].item() == pytest.approx(0.5 * 2.0 * 5.0)


def test_wgan_gp_total_is_wasserstein_plus_weighted_penalty():
    d = Linear([3.0, 4.0])
    real, fake = torch.ones(4, 2), torch.zeros(4, 2)  # D(real) = 7, D(fake) = 0
    loss, stats = build_loss(LossConfig(name="wgan_gp", gp_weight=10.0)).discriminator_loss(
        models(d, fake), real, torch.zeros(4))
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
    loss = build_loss(LossConfig(name=name))
    r, f = torch.full((3,), real), torch.full((3,), fake)
    assert (loss.d_real(r) + loss.d_fake(f)).item() == pytest.approx(d_expected)
    assert loss.g_objective(f).item() == pytest.approx(g_expected)


def test_weight_clipping_only_for_wgan():
    for name, expected in (("wgan", [0.01, -0.01]), ("wgan_gp", [3.0, -4.0]), ("hinge", [3.0, -4.0])):
        d = Linear([3.0, -4.0])
        build_loss(LossConfig(name=name, clip_value=0.01)).after_discriminator_step(d)
        assert d.w.tolist() == pytest.approx(expected)


def test_one_sided_label_smoothing_moves_only_the_real_target():
    smooth = build_loss(LossConfig(name="ns", label_smoothing=0.1))
    plain = build_loss(LossConfig(name="ns"))
    logits = torch.full((4,), 2.0)
    # BCE(2, target 0.9) = softplus(2) - 0.9 * 2
    assert smooth.d_real(logits).item() == pytest.approx(math.log1p(math.exp(2.0)) - 1.8, rel=1e-5)
    assert plain.d_real(logits).item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-5)
    assert smooth.d_fake(logits).item() == plain.d_fake(logits).item()


def test_feature_matching_is_the_squared_distance_of_mean_features():
    d = Linear([0.0, 0.0])  # logits 0: only the matching term differs between the two losses
    real, fake = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)
    with_fm = build_loss(LossConfig(name="ns", feature_matching=2.0))
    loss, stats = with_fm.generator_loss(models(d, fake), real, torch.zeros(2))
    assert stats["feature_matching"].item() == pytest.approx(2.0**2 + 3.0**2)  # means (2, 3) vs (0, 0)
    base, _ = build_loss(LossConfig(name="ns")).generator_loss(models(d, fake), real, torch.zeros(2))
    assert (loss - base).item() == pytest.approx(2.0 * 13.0)


def test_historical_average_penalises_distance_from_the_running_mean():
    net = nn.Linear(2, 1, bias=False)
    history = HistoricalAverage()
    assert history.penalty(net).item() == 0.0  # no history yet
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 1.0]]))
    history.update(net)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 1.0]]))
    assert history.penalty(net).item() == pytest.approx(4.0)
    history.update(net)  # mean of (1, 1) and (3, 1)
    assert history.mean[0].tolist() == [[2.0, 1.0]]
    restored = HistoricalAverage()
    restored.load_state_dict(history.state_dict())
    assert restored.penalty(net).item() == pytest.approx(1.0) and restored.count == 2


def test_vae_terms_train_the_encoder_through_the_generator_loss():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = nn.Linear(2, 3)

        def forward(self, x):
            return self.mu(x), torch.zeros(len(x), 3)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(3, 2)

        def forward(self, z, labels=None):
            return self.out(z)

    torch.manual_seed(0)
    d, encoder, decoder = Linear([1.0, -1.0]), Encoder(), Decoder()
    view = LossView(G=decoder, D=d, D_plain=d, D_penalty=d, E=encoder, z_dim=3, num_classes=0)
    loss = build_loss(LossConfig(name="ns", kl_weight=1.0, recon_weight=1.0))
    total, stats = loss.generator_loss(view, torch.randn(8, 2), torch.zeros(8))
    assert stats["kl"].item() > 0 and stats["recon"].item() > 0
    total.backward()
    assert encoder.mu.weight.grad.abs().sum() > 0 and decoder.out.weight.grad.abs().sum() > 0
    d_loss, d_stats = loss.discriminator_loss(view, torch.randn(8, 2), torch.zeros(8))
    assert torch.isfinite(d_loss)


def test_conditional_models_reject_unlabelled_data():
    """Checked by the stream on the host-side batch (the step itself never syncs for it)."""
    from dist_gan.data import DataError, InMemoryBatches

    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    stream = InMemoryBatches(images, torch.tensor([-1, -1, -1, -1]), batch_size=2, seed=0, num_classes=10)
    with pytest.raises(DataError, match="num_classes=10 needs a label"):
        stream.next_batch()
    InMemoryBatches(images, torch.tensor([0, 9, 3, 3]), batch_size=2, seed=0, num_classes=10).next_batch()


def test_linear_schedule_decays_to_zero_at_max_steps():
    from dist_gan.config import OptimConfig
    from dist_gan.run.nets import build_schedule

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight], lr=1e-3)
    schedule = build_schedule(optimizer, OptimConfig(lr_schedule="linear"), max_steps=10)
    seen = []
    for _ in range(10):
        seen.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([1e-3 * (1 - s / 10) for s in range(10)])
    assert schedule.get_last_lr()[0] == 0.0
    optimizer = torch.optim.Adam([weight], lr=1e-3)
    constant = build_schedule(optimizer, OptimConfig(), max_steps=10)
    optimizer.step()
    constant.step()
    assert constant.get_last_lr()[0] == 1e-3


def test_lazy_r1_runs_every_n_updates_weighted_by_n_and_resumes_its_count():
    d = Linear([1.0, 2.0])  # ||grad||^2 = 5, so each computed R1 is 0.5 * gamma * 5 * every
    loss = build_loss(LossConfig(name="ns", r1_gamma=2.0, r1_every=4))
    seen = []
    for _ in range(6):
        total, stats = loss.discriminator_loss(models(d, torch.zeros(4, 2)), torch.randn(4, 2),
                                               torch.zeros(4))
        loss.after_discriminator_step(d)  # the loop's call after each D update
        seen.append(round(stats["r1"].item(), 6) if "r1" in stats else None)
    assert seen == [5.0, None, None, None, 5.0, None]  # logged unweighted by the interval
    resumed = build_loss(LossConfig(name="ns", r1_gamma=2.0, r1_every=4))
    resumed.load_state_dict(loss.state_dict())
    _, stats = resumed.discriminator_loss(models(d, torch.zeros(4, 2)), torch.randn(4, 2), torch.zeros(4))
    assert "r1" not in stats  # update 6: not due; 8 would be


def test_lazy_intervals_count_updates_not_micro_batches():
    """Under optim.accumulate every micro-batch of a due update gets the penalty; the interval counts
    optimiser updates (after_*_step), not loss calls."""
    d = Linear([1.0, 2.0])
    loss = build_loss(LossConfig(name="ns", r1_gamma=2.0, r1_every=2))
    seen = []
    for _ in range(3):  # three D updates of two micro-batches each
        for _ in range(2):
            _, stats = loss.discriminator_loss(models(d, torch.zeros(4, 2)), torch.randn(4, 2), torch.zeros(4))
            seen.append("r1" in stats)
        loss.after_discriminator_step(d)
    assert seen == [True, True, False, False, True, True]
    assert loss.updates["D"] == 3


def test_losses_are_an_objective_and_their_terms():
    from dist_gan.losses import R1, GradientPenalty, Hinge, Wasserstein, WeightClipping

    wgan_gp = build_loss(LossConfig(name="wgan_gp", r1_gamma=1.0))
    assert isinstance(wgan_gp.objective, Wasserstein)
    assert [type(t) for t in wgan_gp.terms.values() if not hasattr(t, "encode")] == [R1, GradientPenalty]
    assert any(isinstance(t, WeightClipping) for t in build_loss(LossConfig(name="wgan")).terms.values())
    assert isinstance(build_loss(LossConfig(name="hinge")).objective, Hinge)


def test_fp16_penalty_gradient_is_taken_at_the_loss_scale_and_does_not_underflow():
    """Through fp16 weights (DeepSpeed fp16) an input gradient of 1e-8 flushes to zero; taken at the
    loss scale and unscaled in fp32 (PyTorch's AMP recipe) it matches the fp32 penalty."""
    import copy

    from dist_gan.losses import input_gradient, r1_penalty
    from dist_gan.models.base import accept_fp32_io

    d32 = torch.nn.Sequential(torch.nn.Linear(4, 1, bias=False), torch.nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        d32[0].weight.fill_(1e-4)
        d32[1].weight.fill_(1e-4)  # d out / d x_i = 1e-8, below fp16's smallest subnormal (6e-8)
    d16 = accept_fp32_io(copy.deepcopy(d32).half())
    x = torch.randn(8, 4)
    exact = r1_penalty(d32, x)
    assert r1_penalty(d16, x) == 0  # the naive fp16 gradient underflowed
    scaled = r1_penalty(d16, x, scale=2.0 ** 16)
    assert torch.isclose(scaled, exact, rtol=1e-2), (float(scaled), float(exact))
    x.requires_grad_(True)  # a device-tensor scale (the native scaler's) works the same
    grad = input_gradient(d16(x), x, torch.tensor(2.0 ** 16))
    assert grad.dtype == torch.float32 and torch.allclose(grad, torch.full_like(grad, 1e-8), rtol=1e-2)
