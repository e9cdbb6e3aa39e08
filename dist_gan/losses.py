"""Adversarial losses, regularisers and the extra terms of the model families, by name.

A loss is handed the networks (a ``Models`` view, built by the loop) and a real batch with its labels,
and does every forward of its game: it draws the noise (and, for a class-conditional model, the fake
labels), so the loop knows nothing of latents, labels or encoders. ``discriminator_loss`` and
``generator_loss`` return the scalar to minimise and a dict of detached statistics for logging.

Adding a loss: subclass ``GANLoss``, define ``d_real``, ``d_fake`` and ``g_objective`` on logits, add one
line to ``LOSSES``. The Improved-GAN terms (one-sided label smoothing, feature matching, historical
averaging) and the VAE-GAN terms (KL prior, reconstruction in D's feature space) live in the base
class and apply to every loss as the config asks.

Penalties that differentiate through D (WGAN-GP, R1) run their D forward in fp32 with autocast off
(``backend.full_precision``), whatever the run's mixed precision.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.backend import eager, full_precision
from dist_gan.config import LossConfig, lookup
from dist_gan.data import DataError

Stats = dict[str, torch.Tensor]


@dataclass
class Models:
    """The networks as a loss uses them.

    ``G``, ``D``, ``E``: the wrapped modules for training forwards. ``D_plain``: D itself, read in the
    generator step (the loop freezes its parameters there) and by historical averaging.
    ``D_penalty``: what penalties differentiate twice through.
    """

    G: nn.Module
    D: nn.Module
    D_plain: nn.Module
    D_penalty: nn.Module
    E: nn.Module | None
    z_dim: int
    num_classes: int


def _judge(discriminator: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """D's logits in fp32; labels only for a conditional D (any plain module works unconditionally)."""
    return (discriminator(x) if labels is None else discriminator(x, labels)).float()


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """Gulrajani et al.'s penalty: mean over the batch of (||grad_x D(x_hat)||_2 - 1)^2.

    x_hat is a random point on the line between each real and generated sample (judged with the real
    sample's label when D is conditional). The graph is kept (create_graph) so the penalty's own
    gradient reaches D's parameters in the caller's backward.
    """
    real, fake = real.detach().float(), fake.detach().float()
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device)
    with full_precision(real.device):
        x_hat = torch.lerp(fake, real, alpha).requires_grad_(True)
        scores = _judge(discriminator, x_hat, labels)
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
        return (grad.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mescheder et al.'s R1: mean over the batch of ||grad_x D(x)||^2 at real samples (unweighted)."""
    x = real.detach().float().requires_grad_(True)
    with full_precision(real.device):
        scores = _judge(discriminator, x, labels)
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
        return grad.flatten(1).pow(2).sum(1).mean()


class HistoricalAverage:
    """Salimans et al.'s historical averaging: ||theta - (1/t) sum_i theta_i||^2 over a network's
    parameters, the average kept as a running mean of the values after each update."""

    def __init__(self) -> None:
        self.mean: list[torch.Tensor] | None = None
        self.count = 0

    def penalty(self, module: nn.Module) -> torch.Tensor:
        params = [p for p in module.parameters()]
        if self.mean is None:
            return params[0].new_zeros(())
        return sum((p.float() - m).pow(2).sum() for p, m in zip(params, self.mean))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = [p.detach().float() for p in module.parameters()]
        self.count += 1
        if self.mean is None:
            self.mean = [p.clone() for p in params]
        else:
            torch._foreach_lerp_(self.mean, params, 1.0 / self.count)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = state["mean"], int(state["count"])


class GANLoss:
    """Base of every loss: subclasses define the objectives on D's logits."""

    def __init__(self, cfg: LossConfig, autocast: Callable[[], ContextManager] = nullcontext):
        self.cfg = cfg
        self.autocast = autocast
        self.history = {"G": HistoricalAverage(), "D": HistoricalAverage()}

    # --- the game, on logits ---
    def d_real(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_fake(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g_objective(self, fake_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def penalties(self, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                  labels: torch.Tensor | None) -> Stats:
        """Weighted regularisers added to D's loss, by name (already multiplied by their weights)."""
        if self.cfg.r1_gamma > 0:
            return {"r1": 0.5 * self.cfg.r1_gamma * r1_penalty(discriminator, real, labels)}
        return {}

    # --- sampling what the game needs ---
    @staticmethod
    def real_labels(m: Models, labels: torch.Tensor) -> torch.Tensor | None:
        if not m.num_classes:
            return None
        if (labels < 0).any() or (labels >= m.num_classes).any():
            raise DataError(f"model.num_classes={m.num_classes} needs a label in [0, {m.num_classes}) "
                            f"for every image; this batch has labels {labels.unique().tolist()} (-1: "
                            "the dataset has no classes)")
        return labels

    @staticmethod
    def sample(m: Models, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(n, m.z_dim, device=device)
        labels = torch.randint(0, m.num_classes, (n,), device=device) if m.num_classes else None
        return z, labels

    @staticmethod
    def encode(m: Models, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VAE-GAN: (a posterior sample by the reparameterisation trick, mu, logvar)."""
        mu, logvar = m.E(real)
        mu, logvar = mu.float(), logvar.float()
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp(), mu, logvar

    # --- the two objectives ---
    def discriminator_loss(self, m: Models, real: torch.Tensor,
                           labels: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        labels = self.real_labels(m, labels)
        z, fake_labels = self.sample(m, real.shape[0], real.device)
        with torch.no_grad(), self.autocast():
            fake = m.G(z, fake_labels)
            recon = m.G(self.encode(m, real)[0], labels) if m.E is not None else None
        with self.autocast():
            real_logits = m.D(real, labels).float()
            fake_logits = m.D(fake, fake_labels).float()
            recon_logits = m.D(recon, labels).float() if recon is not None else None
        if recon_logits is None:
            loss = self.d_real(real_logits) + self.d_fake(fake_logits)
        else:  # Larsen et al.: reconstructions are fakes too
            loss = self.d_real(real_logits) + 0.5 * (self.d_fake(fake_logits) + self.d_fake(recon_logits))
        penalties = self.penalties(m.D_penalty, real, fake, labels)
        if self.cfg.historical_averaging > 0:
            penalties["hist_avg"] = self.cfg.historical_averaging * self.history["D"].penalty(m.D_plain)
        for value in penalties.values():
            loss = loss + value
        d_real, d_fake = real_logits.mean().detach(), fake_logits.mean().detach()
        stats = {"loss_D": loss.detach(), "D_real": d_real, "D_fake": d_fake,
                 "wasserstein": d_real - d_fake}
        stats.update({name: value.detach() for name, value in penalties.items()})
        return loss, stats

    def generator_loss(self, m: Models, real: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """G's objective through the frozen D, plus feature matching, historical averaging and, with
        an encoder, the VAE terms (the encoder is trained by this same loss)."""
        labels = self.real_labels(m, labels)
        z, fake_labels = self.sample(m, real.shape[0], real.device)
        cfg = self.cfg
        with self.autocast():
            fake = m.G(z, fake_labels)
            fake_logits, fake_features = m.D_plain(fake, fake_labels, return_features=True)
        loss = self.g_objective(fake_logits.float())
        stats: Stats = {}
        real_features = None
        if cfg.feature_matching > 0 or m.E is not None:
            with torch.no_grad(), self.autocast():
                real_features = m.D_plain(real, labels, return_features=True)[1].float()
        if cfg.feature_matching > 0:
            matching = (real_features.mean(0) - fake_features.float().mean(0)).pow(2).sum()
            loss = loss + cfg.feature_matching * matching
            stats["feature_matching"] = matching.detach()
        if m.E is not None:
            z_post, mu, logvar = self.encode(m, real)
            # per image, summed over latent dimensions and features as in Larsen et al.
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
            with self.autocast():
                recon_features = m.D_plain(m.G(z_post, labels), labels, return_features=True)[1]
                # the reconstruction also plays the game, for G only (no GAN gradient into E)
                recon_logits = m.D_plain(m.G(z_post.detach(), labels), labels)
            recon = 0.5 * (recon_features.float() - real_features).pow(2).sum(1).mean()
            loss = (loss + 0.5 * self.g_objective(recon_logits.float()) + cfg.kl_weight * kl
                    + cfg.recon_weight * recon)
            stats.update(kl=kl.detach(), recon=recon.detach())
        if cfg.historical_averaging > 0:
            averaged = self.history["G"].penalty(eager(m.G))
            loss = loss + cfg.historical_averaging * averaged
            stats["hist_avg_G"] = averaged.detach()
        stats["loss_G"] = loss.detach()
        return loss, stats

    # --- hooks after the optimiser steps ---
    @torch.no_grad()
    def after_discriminator_step(self, discriminator: nn.Module) -> None:
        """Constraints on D's weights after its optimiser step; keeps the historical average."""
        if self.cfg.historical_averaging > 0:
            self.history["D"].update(discriminator)

    @torch.no_grad()
    def after_generator_step(self, generator: nn.Module) -> None:
        if self.cfg.historical_averaging > 0:
            self.history["G"].update(generator)

    def state_dict(self) -> dict:
        """What a resume needs (the historical averages), in weights_only-loadable form."""
        return {name: h.state_dict() for name, h in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, h in self.history.items():
            h.load_state_dict(state[name])


class NonSaturating(GANLoss):
    """Goodfellow et al.'s loss with the non-saturating generator objective (the seed's), with
    optional one-sided label smoothing (real target 1 - loss.label_smoothing)."""

    def d_real(self, logits):
        if self.cfg.label_smoothing > 0:
            target = torch.full_like(logits, 1.0 - self.cfg.label_smoothing)
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.softplus(-logits).mean()

    def d_fake(self, logits):
        return F.softplus(logits).mean()

    def g_objective(self, fake_logits):
        return F.softplus(-fake_logits).mean()


class WGAN(GANLoss):
    """Arjovsky et al.'s Wasserstein loss, Lipschitz by clipping D's weights to ±clip_value."""

    def d_real(self, logits):
        return -logits.mean()

    def d_fake(self, logits):
        return logits.mean()

    def g_objective(self, fake_logits):
        return -fake_logits.mean()

    @torch.no_grad()
    def after_discriminator_step(self, discriminator: nn.Module) -> None:
        for param in discriminator.parameters():
            param.clamp_(-self.cfg.clip_value, self.cfg.clip_value)
        super().after_discriminator_step(discriminator)


class WGANGP(WGAN):
    """Wasserstein loss, Lipschitz by the gradient penalty (weight ``gp_weight``) instead of clipping."""

    def penalties(self, discriminator, real, fake, labels):
        found = super().penalties(discriminator, real, fake, labels)
        found["gp"] = self.cfg.gp_weight * gradient_penalty(discriminator, real, fake, labels)
        return found

    @torch.no_grad()
    def after_discriminator_step(self, discriminator: nn.Module) -> None:
        GANLoss.after_discriminator_step(self, discriminator)  # no clipping: the penalty does it


class Hinge(GANLoss):
    """The hinge loss of Lim & Ye / Miyato et al. (SN-GAN, BigGAN)."""

    def d_real(self, logits):
        return F.relu(1.0 - logits).mean()

    def d_fake(self, logits):
        return F.relu(1.0 + logits).mean()

    def g_objective(self, fake_logits):
        return -fake_logits.mean()


LOSSES: dict[str, type[GANLoss]] = {
    "ns": NonSaturating,
    "wgan": WGAN,
    "wgan_gp": WGANGP,
    "hinge": Hinge,
}


def build_loss(cfg: LossConfig, autocast: Callable[[], ContextManager] = nullcontext) -> GANLoss:
    return lookup(LOSSES, "loss.name", cfg.name)(cfg, autocast)
