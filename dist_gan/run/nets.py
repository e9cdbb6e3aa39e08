"""The networks as the loop holds them: G, D (and a VAE-GAN's encoder) built by name, wrapped by their
accelerators, with their optimisers, learning-rate schedules and the generator's EMA; and how many
images a step is (the unit of kimg, the EMA and the schedules)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed

from dist_gan.config import Config, OptimConfig, Ramp
from dist_gan.core.private_api import set_base_lr
from dist_gan.core.seeds import derive
from dist_gan.losses import LossView
from dist_gan.models import build_discriminator, build_encoder, build_generator
from dist_gan.models.augment import Augmentation, AugmentedDiscriminator, build_augmentation
from dist_gan.run import backend
from dist_gan.run.ema import EMA, ema_beta, step_beta


@dataclass
class Net:
    """One network as the loop uses it.

    ``wrapped``: what training forwards and backward go through (DDP-wrapped or an engine,
    maybe compiled). ``plain``: the network itself, for sampling, the EMA, checkpoint weights, and
    reading D in the generator step (its weights frozen there, so no wrapper should see them).
    """

    wrapped: nn.Module
    plain: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Accelerator

    def __post_init__(self) -> None:
        # what trains (Freeze-D leaves some of D out), for freezing it and giving it back
        self.trainable = [p for p in self.plain.parameters() if p.requires_grad]

    def set_trainable(self, on: bool) -> None:
        for parameter in self.trainable:
            parameter.requires_grad_(on)


@dataclass
class Nets:
    """G, D and (VAE-GAN only) the encoder E, trained with G by G's accelerator in the generator
    step; ``D_for_penalty`` / ``G_for_penalty``: what penalties differentiate twice through
    (backend.penalty_view); ``augment``: what every image D judges goes through first (augment.kind)."""

    G: Net
    D: Net
    D_for_penalty: nn.Module
    num_classes: int = 0
    E: Net | None = None
    G_for_penalty: nn.Module | None = None
    augment: Augmentation | None = None

    def loss_view(self, z_dim: int) -> LossView:
        """The view a loss gets: with augmentation, each view of D augments its input first."""
        D_views = [self.D.wrapped, self.D.plain, self.D_for_penalty]
        if self.augment is not None:
            D_views = [AugmentedDiscriminator(view, self.augment) for view in D_views]
        D, D_plain, D_penalty = D_views
        return LossView(self.G.wrapped, D, D_plain, D_penalty, self.E.wrapped if self.E is not None else None,
                        z_dim, self.num_classes,
                        functools.partial(backend.loss_scale, self.D.accelerator, self.D.wrapped),
                        self.G_for_penalty)

    def generator_side(self) -> list[Net]:
        """The networks the generator step updates."""
        return [self.G] if self.E is None else [self.G, self.E]

    def plain(self) -> dict[str, nn.Module]:
        """The plain networks by name (replica checks, finiteness)."""
        return {"G": self.G.plain, "D": self.D.plain, **({"E": self.E.plain} if self.E else {})}

    def replica_values(self) -> dict[str, nn.Module]:
        """The run-state hook: every rank must hold the same weights (DDP's invariant)."""
        return self.plain()

    def weights(self) -> list[nn.Module]:
        return list(self.plain().values())

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Named as their entries in the loop state of a checkpoint."""
        found = {"sched_G": self.G.scheduler, "sched_D": self.D.scheduler}
        if self.E is not None:
            found["sched_E"] = self.E.scheduler
        return found


def build_adam(params, lr: float, betas: tuple[float, float], impl: str) -> torch.optim.Adam:
    """Adam with the implementation ``speed.adam_impl`` names (auto: torch's default choice)."""
    flags = {"auto": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True},
             "fused": {"fused": True}}[impl]
    return torch.optim.Adam(params, lr=lr, betas=betas, **flags)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int,
                   ramp: Ramp | None = None, base_lr: float = 1.0,
                   kimg_per_step: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate factor per step: 1, a linear decay to 0 at ``max_steps``, or ``ramp`` (a
    schedule over kimg, as a factor of the config's ``base_lr``)."""
    if ramp is not None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: ramp.at(s * kimg_per_step) / base_lr)
    if cfg.lr_schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def build_nets(config: Config, acc_G: Accelerator, acc_D: Accelerator | None = None) -> Nets:
    """Build G and D (and E) by name, with optimisers and schedules, prepared by their accelerators.

    Schedulers are built on the unwrapped optimisers and stepped by the loop once per generator
    step (an engine would otherwise step D's once per critic step); they are saved with the loop state.
    """
    acc_D = acc_D or acc_G
    set_seed(derive(config.run.seed, "weights"))  # the same initial weights on every rank
    G, D, E = build_generator(config), build_discriminator(config), build_encoder(config)
    if backend.use_channels_last(config, acc_G):
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    opt, impl, steps = config.optim, config.speed.adam_impl, config.train.max_steps
    opt_G = build_adam(G.parameters(), opt.g_lr, opt.betas, impl)
    # Freeze-D's frozen blocks stay out of D's optimiser (and so out of DDP's and ZeRO's buckets)
    opt_D = build_adam([p for p in D.parameters() if p.requires_grad], opt.d_lr, opt.betas, impl)
    opt_E = build_adam(E.parameters(), opt.g_lr, opt.betas, impl) if E is not None else None
    fixed = config.speed.ddp_fixed_buckets
    if E is not None:  # G first: its weights keep the name model.safetensors
        G_w, E_w, opt_G_w, opt_E_w = backend.prepare(acc_G, "G", G, E, opt_G, opt_E, fixed_buckets=fixed)
    else:
        G_w, opt_G_w = backend.prepare(acc_G, "G", G, opt_G, fixed_buckets=fixed)
    D_w, opt_D_w = backend.prepare(acc_D, "D", D, opt_D, fixed_buckets=fixed)
    G_plain, D_plain = backend.plain(acc_G, G_w), backend.plain(acc_D, D_w)
    D_for_penalty = backend.penalty_view(acc_D, D_w, D_plain)
    G_for_penalty = backend.penalty_view(acc_G, G_w, G_plain)
    if config.speed.compile:  # penalties keep the eager module: compile has no double backward
        G_w, D_w = torch.compile(G_w), torch.compile(D_w)
    kimg_per_step = real_images_per_step(config, acc_G.num_processes) / 1000
    ramp_G, ramp_D = config.schedule.g_lr, config.schedule.d_lr
    nets = Nets(Net(G_w, G_plain, opt_G_w, build_schedule(opt_G, opt, steps, ramp_G, opt.g_lr, kimg_per_step), acc_G),
                Net(D_w, D_plain, opt_D_w, build_schedule(opt_D, opt, steps, ramp_D, opt.d_lr, kimg_per_step), acc_D),
                D_for_penalty, config.model.num_classes, G_for_penalty=G_for_penalty,
                augment=build_augmentation(config.augment))
    if E is not None and opt_E is not None:
        nets.E = Net(E_w, backend.plain(acc_G, E_w), opt_E_w,
                     build_schedule(opt_E, opt, steps, ramp_G, opt.g_lr, kimg_per_step), acc_G)
    return nets



def images_per_step(config: Config, world_size: int) -> int:
    """Images the generator makes per step over all ranks (the EMA's unit, the effective batch)."""
    return config.data.batch_size * world_size * config.optim.accumulate


def real_images_per_step(config: Config, world_size: int) -> int:
    """Real images D reads per step over all ranks (throughput and kimg)."""
    return images_per_step(config, world_size) * config.optim.n_critic


def build_ema(config: Config, generator: nn.Module, world_size: int) -> EMA | None:
    """The generator's EMA as ``train`` says: by images (ema_kimg, or its ramp schedule.ema_kimg),
    by steps (ema_decay), or none."""
    train, ramp = config.train, config.schedule.ema_kimg
    if train.ema_decay is not None:
        beta_at = functools.partial(step_beta, decay=train.ema_decay)
        return EMA(generator, beta_at) if train.ema_decay > 0 else None
    ips = images_per_step(config, world_size)
    if ramp is not None:  # the half-life follows the ramp over the real images seen
        kimg_per_step = real_images_per_step(config, world_size) / 1000

        def ramped(step: int) -> float:
            return ema_beta(step, ips, ramp.at(step * kimg_per_step), train.ema_rampup)

        return EMA(generator, ramped)
    if train.ema_kimg <= 0:
        return None
    return EMA(generator, functools.partial(ema_beta, images_per_step=ips, half_life_kimg=train.ema_kimg,
                                            rampup=train.ema_rampup))



def set_learning_rates(nets: Nets, config: Config, scale: float) -> None:
    """Base learning rates from the config (so a resume may change them) times ``scale`` (< 1 after
    rollbacks), with the schedule's factor for the current step applied."""
    config_lr = {"sched_G": config.optim.g_lr, "sched_D": config.optim.d_lr, "sched_E": config.optim.g_lr}
    for name, scheduler in nets.schedulers().items():
        set_base_lr(scheduler, config_lr[name] * scale)


class LearningRates:
    """The learning rates' scale over the config's base rates: 1, times ``train.rollback_lr_scale``
    at each rollback. A run-state part (its state is the scale); the schedules' factors stay theirs."""

    def __init__(self, nets: Nets, config: Config) -> None:
        self.nets, self.config, self.scale = nets, config, 1.0

    def state_dict(self) -> float:
        return self.scale

    def load_state_dict(self, scale: float) -> None:
        self.scale = float(scale)
        set_learning_rates(self.nets, self.config, self.scale)

    def scale_down(self, factor: float) -> None:
        self.load_state_dict(self.scale * factor)

    def log_values(self, window: dict[str, float], real_images: int) -> dict[str, float]:
        return {"lr_G": float(self.nets.G.scheduler.get_last_lr()[0]),
                "lr_D": float(self.nets.D.scheduler.get_last_lr()[0])}


@torch.no_grad()
def weights_finite(modules: list[nn.Module]) -> bool:
    return bool(torch.stack([p.isfinite().all() for m in modules for p in m.parameters()]).all())
