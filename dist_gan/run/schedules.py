"""Values ramped over training (``config.schedule``): R3GAN's cosine ramps of gamma, the learning
rates, Adam's beta2, the EMA half-life and the augmentation probability.

Each value is a pure function of the images seen (step x real images per step), applied on the host
before every step: no device work, no collective, the same on every rank, and a resumed run that
restores the step continues every ramp exactly. The learning rates are ramped by their LambdaLR
schedulers and the EMA's half-life by its decay function (``nets.build_schedule``, ``nets.build_ema``);
the rest are set here on the loss's terms, the optimisers and the augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch

from dist_gan.config import Ramp, ScheduleConfig
from dist_gan.losses import GANLoss, ZeroCentredPenalty
from dist_gan.models.augment import Augmentation

# The loss term each ramped penalty weight belongs to.
GAMMA_TERMS = {"r1_gamma": "r1", "r2_gamma": "r2"}


@dataclass
class Schedules:
    """The ramps of one run (none: every method does nothing) and the objects they set."""

    ramps: dict[str, Ramp]
    real_images_per_step: int
    loss: GANLoss
    optimizers: dict[str, list[torch.optim.Optimizer]]  # "G" (with E) and "D"
    augment: Augmentation | None
    applied: dict[str, float] = field(default_factory=dict)  # what the latest step used

    def kimg(self, step: int) -> float:
        return step * self.real_images_per_step / 1000

    def values(self, step: int) -> dict[str, float]:
        """Every ramped value at ``step`` (completed steps), by its schedule key."""
        kimg = self.kimg(step)
        return {name: ramp.at(kimg) for name, ramp in self.ramps.items()}

    def apply(self, step: int) -> dict[str, float]:
        """Set every ramped value for the step after ``step``; return them (for the log)."""
        values = self.values(step)
        for name, term in GAMMA_TERMS.items():
            if name in values:
                cast(ZeroCentredPenalty, self.loss.terms[term]).gamma = values[name]
        if "beta2" in values:
            for optimizer in (o for side in self.optimizers.values() for o in side):
                for group in optimizer.param_groups:
                    group["betas"] = (group["betas"][0], values["beta2"])
        if "augment_p" in values and self.augment is not None:
            self.augment.p = values["augment_p"]
        self.applied = values
        return values

    def replica_values(self) -> dict[str, float]:
        """Each ramp is the same function of the step on every rank; a save checks it."""
        return {f"schedule/{name}": value for name, value in self.applied.items()}

    def log_values(self, window: dict[str, float], real_images: int) -> dict[str, float]:
        return self.replica_values()


def build_schedules(cfg: ScheduleConfig, real_images_per_step: int, loss: GANLoss,
                    optimizers: dict[str, list[torch.optim.Optimizer]],
                    augment: Augmentation | None) -> Schedules:
    """The run's schedules (empty when the config ramps nothing)."""
    return Schedules(cfg.ramps(), real_images_per_step, loss, optimizers, augment)
