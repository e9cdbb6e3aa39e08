"""Exponential moving average of the generator's weights (sample from it: it is smoother than G)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """A frozen copy of a network whose parameters trail the live ones.

    The decay ramps up as min(decay, (1 + step) / (10 + step)) so early averages are not dominated
    by the random initialisation; buffers (BatchNorm statistics, spectral-norm vectors) are copied.
    The average is kept in fp32 even when the live weights are bf16/fp16 (an engine's mixed
    precision): in bf16 a step of (1 - decay) x the difference rounds away.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        live = [p.float() for p in model.parameters()]  # no copy when already fp32
        torch._foreach_lerp_(list(self.model.parameters()), live, 1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
