"""Exponential moving average of the generator's weights (sample from it: it is smoother than G)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from dist_gan.core.private_api import private_api


def ema_beta(step: int, images_per_step: int, half_life_kimg: float, rampup: float | None) -> float:
    """The per-step decay for a half-life of ``half_life_kimg`` thousand images (StyleGAN2's rule).

    Measured in images, the same config averages over the same stretch of training whatever the
    number of processes or the batch size. With ``rampup`` the half-life is at most that fraction of
    the images seen so far, so the random initial weights fade from the average early on.
    """
    half_life = half_life_kimg * 1000.0
    if rampup is not None:
        half_life = min(half_life, step * images_per_step * rampup)
    return 0.5 ** (images_per_step / max(half_life, 1e-8))


def step_beta(step: int, decay: float) -> float:
    """The step-based decay: min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """A frozen copy of a network whose parameters trail the live ones.

    The decay comes from ``beta_at(step)`` (``ema_beta`` or ``step_beta``); buffers (BatchNorm
    statistics, spectral-norm vectors) are copied. The average is kept in fp32 even when the live
    weights are bf16/fp16 (an engine's mixed precision): in bf16 a step of (1 - decay) x the
    difference rounds away.
    """

    def __init__(self, model: nn.Module, beta_at):
        self.beta_at, self.source = beta_at, model
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def after_step(self, step: int) -> None:
        """The run-state hook: follow the network this EMA was made from."""
        self.update(self.source, step)

    def weights(self) -> list[nn.Module]:
        return [self.model]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.beta_at(step)
        live = [p.float() for p in model.parameters()]  # no copy when already fp32
        private_api(torch, "_foreach_lerp_")(list(self.model.parameters()), live, 1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def half_life_steps(beta: float) -> float:
    """Steps for the weight of an old value to halve at decay ``beta`` (for logs and docs)."""
    return math.log(0.5) / math.log(beta) if 0 < beta < 1 else math.inf
