"""Adversarial losses: an objective on D's logits, plus the terms the config adds.

A loss is handed the networks (a ``LossView``, built by the loop) and a real batch with its labels,
and does every forward of its game: it draws the noise (and, for a class-conditional model, the fake
labels), so the loop knows nothing of latents, labels or encoders. ``discriminator_loss`` and
``generator_loss`` return the scalar to minimise and a dict of detached statistics for logging.

- **Objectives** (``OBJECTIVES``: ns, wasserstein, hinge) are three functions of logits each.
- **Terms** (``TERMS``) are regularisers and constraints the config switches on: the gradient
  penalty, R1, weight clipping, historical averaging, feature matching, and the VAE-GAN family's
  terms. A term may add to D's loss, to G's loss, and act after either update; with ``every`` > 1 it
  is computed only on that interval of its side's updates and weighted by it (lazy regularisation).
- **Losses** (``LOSSES``, the config's ``loss.name``) are an objective and the terms that define
  them: wgan is the Wasserstein objective with weight clipping, wgan_gp the same with the penalty.

Adding a loss: one line in ``LOSSES``. Adding a term: one ``Term`` subclass and one line in ``TERMS``.
Penalties that differentiate through D (WGAN-GP, R1) run with autocast off (``full_precision``):
under native AMP their D forward is fp32. Under DeepSpeed bf16/fp16 D's weights themselves are half
precision, so the forward runs in it (inputs, the input gradient and the norm in fp32); under fp16
the input gradient is taken at the loss scale and unscaled (``input_gradient``). docs/scale.md.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import ConfigError, LossConfig, lookup
from dist_gan.core.private_api import eager, private_api

Stats = dict[str, torch.Tensor]


def full_precision(device: torch.device) -> ContextManager:
    """Autocast off: penalties that differentiate through D run in fp32 whatever the run's mixed
    precision (a half-precision gradient norm is too coarse, and its square overflows fp16)."""
    return torch.autocast(device_type=device.type, enabled=False)



@dataclass
class LossView:
    """The networks as a loss uses them.

    ``G``, ``D``, ``E``: the wrapped modules for training forwards. ``D_plain``: D itself, read in the
    generator step (the loop freezes its parameters there) and by historical averaging.
    ``D_penalty`` (``G_penalty``): what penalties differentiate twice through. ``penalty_scale``: the fp16 loss
    scale to take the penalty's input gradient at (None: no loss scaling).
    """

    G: nn.Module
    D: nn.Module
    D_plain: nn.Module
    D_penalty: nn.Module
    E: nn.Module | None
    z_dim: int
    num_classes: int
    penalty_scale: Callable[[], float | torch.Tensor | None] = lambda: None
    G_penalty: nn.Module | None = None  # what G-side penalties (path length) differentiate twice through


# --- objectives -------------------------------------------------------------------------------------

class Objective:
    """The game on D's logits: D's loss on real and on fake logits, and G's loss.

    ``d_loss`` / ``g_loss`` see both sides' logits; the default splits D's loss into a real and a
    fake part and G's into a fake part. A relativistic objective (``pairs_real_and_fake``) overrides
    both, and the generator step then also judges the real batch (D frozen, no gradient)."""

    pairs_real_and_fake = False

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def d_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return self.d_real(real_logits) + self.d_fake(fake_logits)

    def g_loss(self, fake_logits: torch.Tensor, real_logits: torch.Tensor | None) -> torch.Tensor:
        return self.g_objective(fake_logits)

    def d_real(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_fake(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g_objective(self, fake_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class NonSaturating(Objective):
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


class Wasserstein(Objective):
    """Arjovsky et al.'s critic: D maximises D(real) - D(fake); Lipschitz by a term (clip or gp)."""

    def d_real(self, logits):
        return -logits.mean()

    def d_fake(self, logits):
        return logits.mean()

    def g_objective(self, fake_logits):
        return -fake_logits.mean()


class Hinge(Objective):
    """The hinge loss of Lim & Ye / Miyato et al. (SN-GAN, BigGAN)."""

    def d_real(self, logits):
        return F.relu(1.0 - logits).mean()

    def d_fake(self, logits):
        return F.relu(1.0 + logits).mean()

    def g_objective(self, fake_logits):
        return -fake_logits.mean()


class RelativisticPairing(Objective):
    """R3GAN's relativistic pairing (RpGAN; Jolicoeur-Martineau 2019, Huang et al. 2024): real image i
    of the batch is paired with fake i, D minimises softplus(D(fake_i) - D(real_i)) and G minimises
    softplus(D(real_i) - D(fake_i)), means over pairs. Pairs never cross ranks or micro-batches:
    each rank pairs its own micro-batch's reals with the fakes it generated for them, and DDP then
    averages the pair losses' gradients, so the game is the same at any world size and accumulation.
    """

    pairs_real_and_fake = True

    def d_loss(self, real_logits, fake_logits):
        return F.softplus(fake_logits - real_logits).mean()

    def g_loss(self, fake_logits, real_logits):
        return F.softplus(real_logits - fake_logits).mean()

    def _unpaired(self, *_):
        raise ConfigError("loss.name = 'rpgan' judges real and fake logits in pairs; it has no loss on "
                          "one side alone (a VAE-GAN's reconstructions need ns, hinge or wgan_gp)")

    d_real = d_fake = g_objective = _unpaired


OBJECTIVES: dict[str, type[Objective]] = {"ns": NonSaturating, "wasserstein": Wasserstein, "hinge": Hinge,
                                          "rpgan": RelativisticPairing}


# --- penalties --------------------------------------------------------------------------------------

def _judge(discriminator: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """D's logits in fp32; labels only for a conditional D (any plain module works unconditionally)."""
    return (discriminator(x) if labels is None else discriminator(x, labels)).float()


def input_gradient(scores: torch.Tensor, x: torch.Tensor,
                   scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """d(sum of ``scores``)/d``x`` in fp32, kept in the graph (create_graph) so a penalty on it
    reaches D's parameters in the caller's backward.

    With an fp16 loss ``scale`` it is PyTorch's AMP recipe for gradient penalties: differentiate the
    scaled mean score (each score's gradient scale / batch, as for a scaled mean loss), then unscale
    in fp32. Through half-precision weights an unscaled input gradient below fp16's smallest
    subnormal (6e-8) would flush to zero; a scaled one that overflows becomes inf, and the step is
    skipped by the fp16 machinery and the scale lowered, as for any fp16 gradient.
    """
    if scale is None:
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
        return grad.float()
    (grad,) = torch.autograd.grad(scores.mean() * scale, x, create_graph=True)
    return grad.float() * (scores.numel() / scale)


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     labels: torch.Tensor | None = None,
                     scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """Gulrajani et al.'s penalty: mean over the batch of (||grad_x D(x_hat)||_2 - 1)^2.

    x_hat is a random point on the line between each real and generated sample (judged with the real
    sample's label when D is conditional); ``scale``: see ``input_gradient``.
    """
    real, fake = real.detach().float(), fake.detach().float()
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device)
    with full_precision(real.device):
        x_hat = torch.lerp(fake, real, alpha).requires_grad_(True)
        grad = input_gradient(_judge(discriminator, x_hat, labels), x_hat, scale)
        return (grad.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


def zero_centred_penalty(logits: torch.Tensor, x: torch.Tensor,
                         scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ||grad_x D(x)||^2 for ``logits`` = D(``x``) computed from an ``x`` that
    requires grad (R1 at reals, R2 at fakes); ``scale``: see ``input_gradient``."""
    with full_precision(x.device):
        return input_gradient(logits, x, scale).flatten(1).pow(2).sum(1).mean()


def penalty_input(images: torch.Tensor) -> torch.Tensor:
    """A fp32 leaf copy of ``images`` that requires grad: what a zero-centred penalty differentiates by."""
    return images.detach().float().requires_grad_(True)


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, labels: torch.Tensor | None = None,
               scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mescheder et al.'s R1 with a forward of its own: mean over the batch of ||grad_x D(x)||^2 at
    real samples (unweighted); ``scale``: see ``input_gradient``. The loss shares D's forward instead
    (``GANLoss.discriminator_loss``); this is the reference it is tested against."""
    x = penalty_input(real)
    with full_precision(real.device):
        return zero_centred_penalty(_judge(discriminator, x, labels), x, scale)


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
        return torch.stack([(p.float() - m).pow(2).sum() for p, m in zip(params, self.mean)]).sum()

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = [p.detach().float() for p in module.parameters()]
        self.count += 1
        if self.mean is None:
            self.mean = [p.clone() for p in params]
        else:
            private_api(torch, "_foreach_lerp_")(self.mean, params, 1.0 / self.count)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = state["mean"], int(state["count"])


# --- terms ------------------------------------------------------------------------------------------

@dataclass
class DiscriminatorStep:
    """What a term sees of a discriminator update."""

    models: LossView
    objective: Objective
    real: torch.Tensor
    labels: torch.Tensor | None
    fake: torch.Tensor
    fake_logits: torch.Tensor
    autocast: Callable[[], ContextManager]
    real_logits: torch.Tensor | None = None
    # the inputs D's logits were computed from, requiring grad, when a due term asked for them
    # (``Term.input_gradient_of``): the penalty then shares the loss's forward
    real_input: torch.Tensor | None = None
    fake_input: torch.Tensor | None = None
    fake_labels: torch.Tensor | None = None


@dataclass
class GeneratorStep:
    """What a term sees of a generator update; ``real_features`` only when a term needs them."""

    models: LossView
    objective: Objective
    real: torch.Tensor
    labels: torch.Tensor | None
    fake_features: torch.Tensor
    real_features: torch.Tensor | None
    autocast: Callable[[], ContextManager]


class Term:
    """A regulariser or constraint the config adds.

    ``discriminator`` / ``generator`` return (what to add to that side's loss, what to log by
    name); ``after_*_step`` act on the plain network after an applied update.
    """

    needs_real_features = False  # D's features of the real batch, in the generator step
    every = 1  # > 1: lazy regularisation, on every ``every``-th update of its side, weighted by it
    # "real" / "fake": D's forward on that side takes an input that requires grad (in fp32, autocast
    # off) when this term is due, and the term differentiates the loss's own logits by it
    input_gradient_of: tuple[str, ...] = ()

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def discriminator(self, step: DiscriminatorStep) -> tuple[torch.Tensor | float, Stats]:
        return 0.0, {}

    def generator(self, step: GeneratorStep) -> tuple[torch.Tensor | float, Stats]:
        return 0.0, {}

    def after_discriminator_step(self, discriminator: nn.Module) -> None:
        pass

    def after_generator_step(self, generator: nn.Module) -> None:
        pass

    def agree(self, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """At log and checkpoint steps (every rank together): make state each rank moved on its own
        the same on every rank, e.g. ``self.x = mean_over_ranks(self.x)``. Never inside the step."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ZeroCentredPenalty(Term):
    """0.5 x ``gamma`` x mean ||grad_x D(x)||^2 on one side's inputs, every ``every`` D updates. It
    differentiates the loss's own logits of that side (StyleGAN2-ADA's "Dboth"): no second forward,
    unless speed.share_penalty_forward is off. ``gamma`` may be ramped by a schedule."""

    name = ""  # the logged statistic
    side = "real"  # "real" (R1) or "fake" (R2)

    def __init__(self, cfg, gamma: float, every: int):
        super().__init__(cfg)
        self.gamma, self.every = gamma, every
        self.input_gradient_of = (self.side,)

    def discriminator(self, step):
        m = step.models
        images, labels, logits, x = ((step.real, step.labels, step.real_logits, step.real_input)
                                     if self.side == "real" else
                                     (step.fake, step.fake_labels, step.fake_logits, step.fake_input))
        if x is None:  # speed.share_penalty_forward off: a forward of its own
            penalty = r1_penalty(m.D_penalty, images, labels, m.penalty_scale())
        else:
            penalty = zero_centred_penalty(logits, x, m.penalty_scale())
        value = 0.5 * self.gamma * penalty
        return value, {self.name: value}


class R1(ZeroCentredPenalty):
    """Mescheder et al.'s R1 on real data: loss.r1_gamma, every loss.r1_every D updates (StyleGAN2's
    lazy regularisation: 16)."""

    name, side = "r1", "real"

    def __init__(self, cfg):
        super().__init__(cfg, cfg.r1_gamma, cfg.r1_every)


class R2(ZeroCentredPenalty):
    """The zero-centred penalty on fake data (R3GAN's R2): loss.r2_gamma, every loss.r2_every D updates."""

    name, side = "r2", "fake"

    def __init__(self, cfg):
        super().__init__(cfg, cfg.r2_gamma, cfg.r2_every)


class GradientPenalty(Term):
    """WGAN-GP's penalty, weight loss.gp_weight."""

    def discriminator(self, step):
        value = self.cfg.gp_weight * gradient_penalty(step.models.D_penalty, step.real, step.fake,
                                                      step.labels, step.models.penalty_scale())
        return value, {"gp": value}


class WeightClipping(Term):
    """The original WGAN's Lipschitz constraint: D's weights clipped to ±loss.clip_value."""

    @torch.no_grad()
    def after_discriminator_step(self, discriminator):
        for param in discriminator.parameters():
            param.clamp_(-self.cfg.clip_value, self.cfg.clip_value)


class FeatureMatching(Term):
    """Salimans et al.'s feature matching: ||E f(x) - E f(G(z))||^2 in D's last hidden layer."""

    needs_real_features = True

    def generator(self, step):
        matching = (step.real_features.mean(0) - step.fake_features.float().mean(0)).pow(2).sum()
        return self.cfg.feature_matching * matching, {"feature_matching": matching}


class VAEGAN(Term):
    """Larsen et al.'s VAE-GAN, active when the model set has an encoder (model.encoder): the
    reconstructions G(E(x)) are half of D's fakes, and G with E also minimise the KL prior term,
    the reconstruction error in D's feature space, and the game on reconstructions (no GAN gradient
    into E)."""

    needs_real_features = True

    @staticmethod
    def encode(m: LossView, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a posterior sample by the reparameterisation trick, mu, logvar)."""
        assert m.E is not None, "the vaegan term needs an encoder (model.encoder)"
        mu, logvar = m.E(real)
        mu, logvar = mu.float(), logvar.float()
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp(), mu, logvar

    def discriminator(self, step):
        m = step.models
        if m.E is None:
            return 0.0, {}
        with torch.no_grad(), step.autocast():
            recon = m.G(self.encode(m, step.real)[0], step.labels)
        with step.autocast():
            recon_logits = m.D(recon, step.labels).float()
        # d_fake(fake) becomes the mean of d_fake over fakes and reconstructions
        d_fake = step.objective.d_fake
        return 0.5 * (d_fake(recon_logits) - d_fake(step.fake_logits)), {}

    def generator(self, step):
        m, real, labels = step.models, step.real, step.labels
        if m.E is None:
            return 0.0, {}
        z_post, mu, logvar = self.encode(m, real)
        # per image, summed over latent dimensions and features as in Larsen et al.
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
        with step.autocast():
            recon_features = m.D_plain(m.G(z_post, labels), labels, return_features=True)[1]
            recon_logits = m.D_plain(m.G(z_post.detach(), labels), labels)
        recon = 0.5 * (recon_features.float() - step.real_features).pow(2).sum(1).mean()
        added = (0.5 * step.objective.g_objective(recon_logits.float()) + self.cfg.kl_weight * kl
                 + self.cfg.recon_weight * recon)
        return added, {"kl": kl, "recon": recon}


class HistoricalAveraging(Term):
    """Salimans et al.'s historical averaging on both networks, weight loss.historical_averaging."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.history = {"G": HistoricalAverage(), "D": HistoricalAverage()}

    def discriminator(self, step):
        value = self.cfg.historical_averaging * self.history["D"].penalty(step.models.D_plain)
        return value, {"hist_avg": value}

    def generator(self, step):
        averaged = self.history["G"].penalty(eager(step.models.G))
        return self.cfg.historical_averaging * averaged, {"hist_avg_G": averaged}

    def after_discriminator_step(self, discriminator):
        self.history["D"].update(discriminator)

    def after_generator_step(self, generator):
        self.history["G"].update(generator)

    def state_dict(self):
        return {name: h.state_dict() for name, h in self.history.items()}

    def load_state_dict(self, state):
        for name, h in self.history.items():
            h.load_state_dict(state[name])


class PathLength(Term):
    """StyleGAN2's path length regularisation: for y ~ N(0, I) / sqrt(H W), the length
    ||J_w^T y|| of the generator's Jacobian at w is pulled towards its running mean ``a``, i.e.
    loss.pl_weight x (||J_w^T y|| - a)^2, on a batch loss.pl_batch_shrink times smaller, every
    loss.pl_every G updates. ``a`` moves by loss.pl_decay per evaluation from this rank's batch mean,
    with no collective inside the step; at every log and checkpoint step the ranks agree on it
    (``agree``: the mean over ranks), so a checkpoint holds one ``a`` and a resume restores it
    exactly. Computed in fp32 (autocast off), as the other penalties."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.every = cfg.pl_every
        self.mean = torch.zeros(())

    def generator(self, step):
        m = step.models
        n = max(step.real.shape[0] // self.cfg.pl_batch_shrink, 1)
        z, labels = GANLoss.sample(m, n, step.real.device)
        with full_precision(step.real.device):
            images, ws = m.G_penalty(z, labels, return_ws=True)
            images = images.float()
            noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
            (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
            lengths = grad.float().square().sum(2).mean(1).sqrt()
        batch_mean = lengths.mean().detach()
        self.mean = self.mean.to(batch_mean.device).lerp(batch_mean, self.cfg.pl_decay)
        value = self.cfg.pl_weight * (lengths - self.mean).square().mean()
        return value, {"pl": value, "pl_mean": self.mean}

    def agree(self, mean_over_ranks):
        self.mean = mean_over_ranks(self.mean)

    def state_dict(self):
        return {"mean": self.mean.detach().cpu()}

    def load_state_dict(self, state):
        self.mean = state["mean"].clone()


# A term's factory: the term when the config switches it on, else None. The order of this table is
# the order of the sums (and of the logged statistics).
TERMS: dict[str, Callable[[LossConfig], Term | None]] = {
    "r1": lambda cfg: R1(cfg) if cfg.r1_gamma > 0 else None,
    "r2": lambda cfg: R2(cfg) if cfg.r2_gamma > 0 else None,
    "gp": GradientPenalty,
    "clip": WeightClipping,
    "feature_matching": lambda cfg: FeatureMatching(cfg) if cfg.feature_matching > 0 else None,
    "vaegan": VAEGAN,
    "hist_avg": lambda cfg: HistoricalAveraging(cfg) if cfg.historical_averaging > 0 else None,
    "pl": lambda cfg: PathLength(cfg) if cfg.pl_weight > 0 else None,
}
# Terms every loss gets (each switched on by its own config weight, or by an encoder for vaegan);
# the others only where a loss's definition names them.
SHARED_TERMS = ("r1", "r2", "feature_matching", "vaegan", "hist_avg", "pl")


@dataclass(frozen=True)
class LossSpec:
    """A named loss: its objective and the terms that are part of its definition."""

    objective: str
    terms: tuple[str, ...] = ()


LOSSES: dict[str, LossSpec] = {
    "ns": LossSpec("ns"),
    "wgan": LossSpec("wasserstein", ("clip",)),
    "wgan_gp": LossSpec("wasserstein", ("gp",)),
    "hinge": LossSpec("hinge"),
    "rpgan": LossSpec("rpgan"),
}


class GANLoss:
    """An objective and its terms, playing the game on the networks a ``LossView`` gives."""

    def __init__(self, cfg: LossConfig, autocast: Callable[[], ContextManager] = nullcontext,
                 share_forward: bool = True):
        spec = lookup(LOSSES, "loss.name", cfg.name)
        self.cfg, self.autocast, self.share_forward = cfg, autocast, share_forward
        self.objective = OBJECTIVES[spec.objective](cfg)
        wanted = set(spec.terms) | set(SHARED_TERMS)
        self.terms = {name: term for name, factory in TERMS.items()
                      if name in wanted and (term := factory(cfg)) is not None}
        self.updates = {"D": 0, "G": 0}  # updates of each side so far: when lazy terms are due

    def _due(self, side: str) -> list[tuple[Term, int]]:
        """The terms due at this ``side`` update, each with its weight (its interval). Updates are
        counted by ``after_*_step`` (once per optimiser step), so every micro-batch of an
        accumulated update sees the same terms."""
        count = self.updates[side]
        return [(t, t.every) for t in self.terms.values() if count % t.every == 0]

    # the objective's functions, for callers that judge logits directly
    def d_real(self, logits: torch.Tensor) -> torch.Tensor:
        return self.objective.d_real(logits)

    def d_fake(self, logits: torch.Tensor) -> torch.Tensor:
        return self.objective.d_fake(logits)

    def g_objective(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return self.objective.g_objective(fake_logits)

    @staticmethod
    def real_labels(m: LossView, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The batch's labels for a conditional model (their range is checked by the data stream,
        on the host before the copy, so the step never waits on the device for it)."""
        return labels if m.num_classes else None

    @staticmethod
    def sample(m: LossView, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(n, m.z_dim, device=device)
        labels = torch.randint(0, m.num_classes, (n,), device=device) if m.num_classes else None
        return z, labels

    def _judge_for(self, m: LossView, images: torch.Tensor, labels: torch.Tensor | None,
                   with_input_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D's fp32 logits on ``images`` and, when a due penalty differentiates them
        (``with_input_grad``), the fp32 input that requires grad they were computed from: then the
        forward runs through the penalty's view of D with autocast off, and serves loss and penalty."""
        if not with_input_grad:
            with self.autocast():
                return m.D(images, labels).float(), None
        x = penalty_input(images)
        with full_precision(x.device):
            return _judge(m.D_penalty, x, labels), x

    def discriminator_loss(self, m: LossView, real: torch.Tensor,
                           labels: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
        labels = self.real_labels(m, labels)
        z, fake_labels = self.sample(m, real.shape[0], real.device)
        with torch.no_grad(), self.autocast():
            fake = m.G(z, fake_labels)
        due = self._due("D")
        wanted = {side for term, _ in due for side in term.input_gradient_of} if self.share_forward else set()
        real_logits, real_input = self._judge_for(m, real, labels, "real" in wanted)
        fake_logits, fake_input = self._judge_for(m, fake, fake_labels, "fake" in wanted)
        loss = self.objective.d_loss(real_logits, fake_logits)
        step = DiscriminatorStep(m, self.objective, real, labels, fake, fake_logits, self.autocast,
                                 real_logits, real_input, fake_input, fake_labels)
        d_real, d_fake = real_logits.mean().detach(), fake_logits.mean().detach()
        # D_real_sign: E[sign(D(real))], ADA's over-fitting heuristic r_t (1: D sure of every real)
        stats = {"D_real": d_real, "D_fake": d_fake, "wasserstein": d_real - d_fake,
                 "D_real_sign": real_logits.sign().mean().detach()}
        for term, weight in due:
            added, logged = term.discriminator(step)
            loss = loss + (added * weight if weight > 1 else added)
            stats.update({name: value.detach() for name, value in logged.items()})
        stats["loss_D"] = loss.detach()
        return loss, stats

    def generator_loss(self, m: LossView, real: torch.Tensor,
                       labels: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
        """G's objective through the frozen D, plus the terms (with an encoder, the VAE-GAN terms,
        which train the encoder by this same loss). A relativistic objective also judges the real
        batch (no gradient: D is frozen and the reals are data)."""
        labels = self.real_labels(m, labels)
        z, fake_labels = self.sample(m, real.shape[0], real.device)
        with self.autocast():
            fake = m.G(z, fake_labels)
            fake_logits, fake_features = m.D_plain(fake, fake_labels, return_features=True)
        real_logits = real_features = None
        wants_features = any(t.needs_real_features and (m.E is not None or not isinstance(t, VAEGAN))
                             for t in self.terms.values())
        if wants_features or self.objective.pairs_real_and_fake:
            with torch.no_grad(), self.autocast():
                real_logits, real_features = m.D_plain(real, labels, return_features=True)
            real_logits, real_features = real_logits.float(), real_features.float()
        loss = self.objective.g_loss(fake_logits.float(), real_logits)
        step = GeneratorStep(m, self.objective, real, labels, fake_features, real_features, self.autocast)
        stats: Stats = {}
        for term, weight in self._due("G"):
            added, logged = term.generator(step)
            loss = loss + (added * weight if weight > 1 else added)
            stats.update({name: value.detach() for name, value in logged.items()})
        stats["loss_G"] = loss.detach()
        return loss, stats

    @torch.no_grad()
    def after_discriminator_step(self, discriminator: nn.Module) -> None:
        """After each D update (all its micro-batches): terms act, the update is counted."""
        for term in self.terms.values():
            term.after_discriminator_step(discriminator)
        self.updates["D"] += 1

    @torch.no_grad()
    def after_generator_step(self, generator: nn.Module) -> None:
        for term in self.terms.values():
            term.after_generator_step(generator)
        self.updates["G"] += 1

    def agree(self, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Every term's per-rank state agreed over ranks (see ``Term.agree``)."""
        for term in self.terms.values():
            term.agree(mean_over_ranks)

    def state_dict(self) -> dict:
        """What a resume needs (update counts, the historical averages), weights_only-loadable."""
        terms = {name: state for name, term in self.terms.items() if (state := term.state_dict())}
        return {"updates": dict(self.updates), "terms": terms}

    def load_state_dict(self, state: dict) -> None:
        if "terms" not in state:  # written before terms existed: the historical averages alone
            state = {"updates": {"D": 0, "G": 0}, "terms": {"hist_avg": state}}
        self.updates = {side: int(n) for side, n in state["updates"].items()}
        for name, term in self.terms.items():
            if name in state["terms"]:
                term.load_state_dict(state["terms"][name])


def build_loss(cfg: LossConfig, autocast: Callable[[], ContextManager] = nullcontext,
               share_forward: bool = True) -> GANLoss:
    return GANLoss(cfg, autocast, share_forward)
