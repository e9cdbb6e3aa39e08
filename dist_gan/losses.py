"""Adversarial losses and discriminator regularisers, by name.

A loss owns the discriminator and generator objectives of one game. ``discriminator_loss`` gets the
discriminator module, real and generated images; ``generator_loss`` gets the discriminator and
generated images. Both return the scalar to minimise and a dict of detached statistics for logging.
Adding a loss: subclass ``GANLoss``, define the two objectives on logits, add one line to ``LOSSES``.

Penalties that differentiate through D (WGAN-GP, R1) run their D forward in fp32 with autocast off,
whatever the run's mixed precision: the gradient norm of a half-precision forward is too coarse and
its square overflows fp16.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import LossConfig

Stats = dict[str, torch.Tensor]


def _fp32(device: torch.device) -> ContextManager:
    return torch.autocast(device_type=device.type, enabled=False)


def eager(module: nn.Module) -> nn.Module:
    """The uncompiled module behind a ``torch.compile`` wrapper (double backward needs eager mode)."""
    return getattr(module, "_orig_mod", module)


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Gulrajani et al.'s penalty: mean over the batch of (||grad_x D(x_hat)||_2 - 1)^2.

    x_hat is a random point on the line between each real and generated sample. The graph is kept
    (create_graph) so the penalty's own gradient reaches D's parameters in the caller's backward.
    """
    real, fake = real.detach().float(), fake.detach().float()
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device)
    with _fp32(real.device):
        x_hat = torch.lerp(fake, real, alpha).requires_grad_(True)
        scores = discriminator(x_hat).float()
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
        return (grad.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """Mescheder et al.'s R1: mean over the batch of ||grad_x D(x)||^2 at real samples (unweighted)."""
    x = real.detach().float().requires_grad_(True)
    with _fp32(real.device):
        scores = discriminator(x).float()
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
        return grad.flatten(1).pow(2).sum(1).mean()


class GANLoss:
    """Base of every loss: subclasses define the objectives on D's logits."""

    def __init__(self, cfg: LossConfig, autocast: Callable[[], ContextManager] = nullcontext):
        self.cfg = cfg
        self.autocast = autocast

    def d_objective(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g_objective(self, fake_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def penalties(self, discriminator: nn.Module, real: torch.Tensor,
                  fake: torch.Tensor) -> Stats:
        """Weighted regularisers added to D's loss, by name (already multiplied by their weights)."""
        if self.cfg.r1_gamma > 0:
            return {"r1": 0.5 * self.cfg.r1_gamma * r1_penalty(discriminator, real)}
        return {}

    def discriminator_loss(self, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                           penalty_net: nn.Module | None = None) -> tuple[torch.Tensor, Stats]:
        """D's objective plus its penalties; ``penalty_net`` is the module penalties differentiate
        twice through (default: ``discriminator`` without its torch.compile wrapper)."""
        with self.autocast():
            real_logits = discriminator(real).float()
            fake_logits = discriminator(fake.detach()).float()
        loss = self.d_objective(real_logits, fake_logits)
        penalties = self.penalties(penalty_net or eager(discriminator), real, fake)
        for value in penalties.values():
            loss = loss + value
        d_real, d_fake = real_logits.mean().detach(), fake_logits.mean().detach()
        stats = {"loss_D": loss.detach(), "D_real": d_real, "D_fake": d_fake,
                 "wasserstein": d_real - d_fake}
        stats.update({name: value.detach() for name, value in penalties.items()})
        return loss, stats

    def generator_loss(self, discriminator: nn.Module,
                       fake: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        with self.autocast():
            fake_logits = discriminator(fake).float()
        loss = self.g_objective(fake_logits)
        return loss, {"loss_G": loss.detach()}

    @torch.no_grad()
    def after_discriminator_step(self, discriminator: nn.Module) -> None:
        """Hook for constraints applied to D's weights after its optimiser step."""


class NonSaturating(GANLoss):
    """Goodfellow et al.'s loss with the non-saturating generator objective (the seed's)."""

    def d_objective(self, real_logits, fake_logits):
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()

    def g_objective(self, fake_logits):
        return F.softplus(-fake_logits).mean()


class WGAN(GANLoss):
    """Arjovsky et al.'s Wasserstein loss, Lipschitz by clipping D's weights to ±clip_value."""

    def d_objective(self, real_logits, fake_logits):
        return fake_logits.mean() - real_logits.mean()

    def g_objective(self, fake_logits):
        return -fake_logits.mean()

    @torch.no_grad()
    def after_discriminator_step(self, discriminator: nn.Module) -> None:
        for param in discriminator.parameters():
            param.clamp_(-self.cfg.clip_value, self.cfg.clip_value)


class WGANGP(WGAN):
    """Wasserstein loss, Lipschitz by the gradient penalty (weight ``gp_weight``) instead of clipping."""

    def penalties(self, discriminator, real, fake):
        found = super().penalties(discriminator, real, fake)
        found["gp"] = self.cfg.gp_weight * gradient_penalty(discriminator, real, fake)
        return found

    @torch.no_grad()
    def after_discriminator_step(self, discriminator: nn.Module) -> None:
        pass  # no clipping: the penalty keeps D Lipschitz


class Hinge(GANLoss):
    """The hinge loss of Lim & Ye / Miyato et al. (SN-GAN, BigGAN)."""

    def d_objective(self, real_logits, fake_logits):
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()

    def g_objective(self, fake_logits):
        return -fake_logits.mean()


LOSSES: dict[str, type[GANLoss]] = {
    "ns": NonSaturating,
    "wgan": WGAN,
    "wgan_gp": WGANGP,
    "hinge": Hinge,
}


def build_loss(cfg: LossConfig, autocast: Callable[[], ContextManager] = nullcontext) -> GANLoss:
    return LOSSES[cfg.name](cfg, autocast)
