"""Augmentation (issue 17): DiffAugment's and ADA's groups, ADA's p controller, the D view that
augments real, fake and penalty inputs, x-flips and data.limit; a 2-process ADA run killed and
resumed bit-exact with p identical on both ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dist_gan.config import AugmentConfig, ConfigError, load_config
from dist_gan.losses import GANLoss, LossView, build_loss
from dist_gan.models.augment import (
    DIFFAUGMENT_GROUPS,
    AdaptiveAugment,
    AugmentedDiscriminator,
    DiffAugment,
    ada_pipeline,
    build_augmentation,
)

from conftest import read_metrics, run_cli

pytestmark = pytest.mark.tier("unit")

# (name, transform(images, p)) for every group of both kinds
GROUPS = [(f"diffaugment.{g}", fn) for g, fn in DIFFAUGMENT_GROUPS.items()] + [
    (f"ada.{g}", lambda x, p, g=g: ada_pipeline(x, p, [g])) for g in ("blit", "geom", "color")]
GEOMETRIC = {"diffaugment.translation", "diffaugment.cutout", "ada.blit", "ada.geom"}


def images(channels: int, size: int = 28, n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name,transform", GROUPS, ids=[g for g, _ in GROUPS])
def test_each_group_is_the_identity_at_p0_and_changes_every_image_at_p1(name, transform, channels):
    x = images(channels)
    assert torch.equal(transform(x, 0.0), x)
    torch.manual_seed(1)
    y = transform(x, 1.0)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    changed = (y - x).flatten(1).abs().amax(1) > 1e-4
    if name == "ada.color" and channels == 1:  # hue and saturation do nothing to grey
        assert changed.float().mean() >= 0.75
    else:
        assert changed.float().mean() >= 0.9, f"{name}: only {int(changed.sum())} of {len(x)} changed"
    if name in GEOMETRIC:  # resampling and zero fill stay within the data's range
        assert y.min() >= min(x.min(), 0.0) - 1e-5 and y.max() <= max(x.max(), 0.0) + 1e-5


@pytest.mark.parametrize("name,transform", GROUPS, ids=[g for g, _ in GROUPS])
def test_gradients_reach_the_input_and_a_seed_fixes_the_draw(name, transform):
    x = images(3, size=32).requires_grad_(True)
    torch.manual_seed(5)
    y = transform(x, 1.0)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.manual_seed(5)
    again = transform(x.detach(), 1.0)
    torch.manual_seed(6)
    other = transform(x.detach(), 1.0)
    assert torch.equal(again, y.detach()) and not torch.equal(other, again)


def test_pixel_blitting_moves_pixels_without_blurring_them():
    """x-flips, quarter turns and whole-pixel shifts: every output value is an input value."""
    x = images(1, size=28, n=8)
    torch.manual_seed(3)
    y = ada_pipeline(x, 1.0, ["blit"])
    for src, out in zip(x, y):
        distance = (out.flatten()[:, None] - src.flatten()[None, :]).abs().amin(1)
        assert distance.max() < 1e-5


def test_ada_rotation_probability_makes_p_overall():
    """ADA splits a rotation into two with probability 1 - sqrt(1 - p) each: rotated at all with p."""
    from dist_gan.models.augment import geometric_matrices

    torch.manual_seed(0)
    n, p = 20000, 0.4
    matrices, _ = geometric_matrices(n, p, torch.device("cpu"))
    rotated = [(m[:, 0, 1] != 0) for m in (matrices[1], matrices[3])]  # the two rotations
    assert abs((rotated[0] | rotated[1]).float().mean().item() - p) < 0.02


def test_diffaugment_policy_runs_in_order_and_p_defaults_to_one():
    aug = build_augmentation(AugmentConfig(kind="diffaugment"))
    assert isinstance(aug, DiffAugment) and aug.p == 1.0 and aug.groups == ["color", "translation", "cutout"]
    assert build_augmentation(AugmentConfig()) is None
    with pytest.raises(ConfigError, match="augment.policy .*diffaugment groups are"):
        load_config(None, {"augment.kind": "diffaugment", "augment.policy": "color,blit"})
    with pytest.raises(ConfigError, match="augment.kind"):
        load_config(None, {"augment.kind": "adda"})
    with pytest.raises(ConfigError, match="augment.target"):
        load_config(None, {"augment.kind": "ada", "augment.target": 1.5})


class ConstantD(nn.Module):
    """A stub discriminator whose verdict on every image is ``value`` (> 0: sure it is real)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, images, labels=None, return_features=False):
        logits = self.weight * self.value + 0 * images.flatten(1).sum(1)
        return (logits, images.flatten(1)) if return_features else logits


class TinyG(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3 * 16 * 16)

    def forward(self, z, labels=None):
        return torch.tanh(self.fc(z)).view(-1, 3, 16, 16)


def ada_step(value: float, p: float, images_seen: int = 10000) -> float:
    """p after one adjustment from a window in which D said ``value`` of every real image."""
    aug = AdaptiveAugment(AugmentConfig(kind="ada", p=p, target=0.6, speed_kimg=100))
    D = AugmentedDiscriminator(ConstantD(value), aug)
    G = TinyG()
    models = LossView(G, D, D, D, None, 8, 0)
    _, stats = build_loss(load_config(None, {"loss.name": "hinge"}).loss).discriminator_loss(
        models, images(3, 16, n=8), torch.zeros(8, dtype=torch.long))
    aug.adjust(float(stats["D_real_sign"]), images_seen)
    return aug.p


def test_ada_p_rises_when_d_overfits_and_falls_when_it_does_not():
    assert ada_step(+2.0, 0.3) == pytest.approx(0.3 + 10000 / 100000)  # r_t = 1 > 0.6
    assert ada_step(-2.0, 0.3) == pytest.approx(0.3 - 10000 / 100000)  # r_t = -1 < 0.6
    assert ada_step(+2.0, 0.95) == 1.0 and ada_step(-2.0, 0.05) == 0.0  # clamped to [0, 1]
    fixed = AdaptiveAugment(AugmentConfig(kind="ada", p=0.25, target=None))
    fixed.adjust(1.0, 10**6)
    assert fixed.p == 0.25
    fixed.load_state_dict({"p": 0.75})
    assert fixed.state_dict() == {"p": 0.75}


def test_generator_and_penalties_differentiate_through_the_augmentation():
    """G's loss reaches G through the augmented D, and R1's input gradient is taken through it."""
    from dist_gan.losses import r1_penalty

    torch.manual_seed(0)
    aug = AdaptiveAugment(AugmentConfig(kind="ada", p=1.0))
    D_plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1), nn.Flatten(0))
    D = AugmentedDiscriminator(D_plain, aug)
    G = TinyG()
    fake = G(torch.randn(4, 8))
    GANLoss(load_config(None, {"loss.name": "ns"}).loss).objective.g_objective(D(fake)).backward()
    assert G.fc.weight.grad.abs().sum() > 0
    real = images(3, 16, n=4)
    torch.manual_seed(1)
    augmented = r1_penalty(D, real)
    plain = r1_penalty(D_plain, real)
    augmented.backward()
    assert D_plain[1].weight.grad.abs().sum() > 0 and not torch.isclose(augmented, plain)
    assert list(D.parameters()) == list(D_plain.parameters())


def test_the_loop_gives_losses_augmented_views_of_d(mnist_dir):
    from accelerate import Accelerator

    from dist_gan.run.nets import build_nets

    config = load_config("configs/mnist_dcgan.yaml", {
        "augment.kind": "ada", "model.generator.width": 8, "model.discriminator.width": 8,
        "data.mnist_dir": str(mnist_dir)})
    nets = build_nets(config, Accelerator(cpu=True))
    models = nets.loss_view(config.model.z_dim)
    assert all(isinstance(v, AugmentedDiscriminator) and v.augmentation is nets.augment
               for v in (models.D, models.D_plain, models.D_penalty))


def test_xflip_mirrors_each_image_in_alternate_epochs_and_limit_takes_a_fixed_subset(mnist_dir):
    from dist_gan.data import build_batch_stream

    cfg = load_config(None, {"data.mnist_dir": str(mnist_dir), "data.format": "memory", "data.limit": 256,
                             "data.batch_size": 256, "data.xflip": True}).data
    epochs = []
    for _ in range(3):
        stream = build_batch_stream(cfg, 0, 0, 1, "cpu")
        stream.load_state_dict({"epoch": len(epochs), "batch": 0})
        batch, labels = stream.next_batch()
        order = stream._order
        epochs.append(dict(zip(order.tolist(), batch)))
    plain = {**cfg.__dict__, "xflip": False}
    stream = build_batch_stream(type(cfg)(**plain), 0, 0, 1, "cpu")
    reference = dict(zip(stream._order.tolist(), stream.next_batch()[0]))
    assert len(reference) == 256
    flipped = [sum(not torch.equal(e[i], reference[i]) for i in reference) for e in epochs]
    assert all(80 < f < 176 for f in flipped), flipped  # about half of them, each epoch
    for i in reference:  # alternating: epoch 0 and 2 agree, epoch 1 is the mirror of both
        assert torch.equal(epochs[0][i], epochs[2][i])
        assert torch.equal(epochs[1][i], epochs[0][i].flip(-1))
    with pytest.raises(ConfigError, match="data.limit .*prepare --limit"):
        load_config(None, {"data.limit": 100})


@pytest.mark.tier("cluster")
@pytest.mark.slow
def test_two_process_ada_run_killed_and_resumed_bit_exact(tmp_path, mnist_dir):
    """ADA with x-flips on 512 MNIST images over 2 DDP processes: p moves, is the same on both
    ranks at every checkpoint, and a SIGKILL after the step-4 checkpoint resumes bit-exact."""
    from helpers import CPU_DDP, assert_same_weights, events, kill_and_resume

    def args(run):
        return ["dist_gan.train", "configs/mnist_dcgan.yaml", f"--run.dir={run}", f"--data.mnist_dir={mnist_dir}",
                "--data.format=memory", "--data.limit=512", "--data.xflip=true", "--data.batch_size=16",
                "--model.generator.width=8", "--model.discriminator.width=8", "--model.z_dim=16",
                "--augment.kind=ada", "--augment.p=0.5", "--augment.speed_kimg=0.5", "--loss.r1_gamma=0.1",
                "--model.discriminator.norm=none", "--run.log_every=2", "--run.sample_every=100",
                "--train.max_steps=8", "--run.ckpt_every=4"]

    launch = [*CPU_DDP, "--num_processes", "2"]
    straight = tmp_path / "straight"
    run_cli(args(straight), launch)
    ps = [r["augment_p"] for r in read_metrics(straight) if "augment_p" in r]
    assert len(ps) == 4 and len(set(ps)) > 1, ps
    assert all(e["replicas_identical"] == {"G": True, "D": True, "augment_p": True}
               for e in events(straight, "checkpoint"))

    killed = tmp_path / "killed"
    kill_and_resume(args(killed), killed, launch=launch, kill_after=6, resumes_from=4, end=8)
    assert_same_weights(straight / "checkpoints" / "step_00000008", killed / "checkpoints" / "step_00000008")
    a, b = (torch.load(run / "checkpoints" / "step_00000008" / "trainer_state.pt", weights_only=True)["augment"]
            for run in (straight, killed))
    assert a == b and a["p"] == ps[-1]
    assert [r["augment_p"] for r in read_metrics(killed) if "augment_p" in r][-2:] == ps[-2:]
