"""What differs between a run's backends, behind one small interface: ``DDP`` (one process, or DDP
on gloo/NCCL: ``backend.ddp``) and ``DeepSpeed`` (ZeRO 1/2 engines: ``backend.deepspeed``). The
backend module picks the strategy from the Accelerator and otherwise knows no backend by name."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator


class Strategy:
    """The decisions one backend makes for a run; every method takes the Accelerator it is for."""

    name: str = ""
    # ZeRO partitions optimizer state per rank: a checkpoint resumes only at its world size.
    partitions_optimizer: bool = False
    # Whether NHWC memory is allowed (DeepSpeed flattens parameters through contiguous views).
    allows_channels_last: bool = True

    def prepare(self, accelerator: Accelerator, name: str, objects: tuple, fixed_buckets: bool) -> tuple:
        """``accelerator.prepare(*objects)`` for network ``name`` ("G" or "D")."""
        raise NotImplementedError

    def plain(self, accelerator: Accelerator, module: nn.Module) -> nn.Module:
        """The network behind its wrapper, the autocast wrapper on its forward taken off."""
        raise NotImplementedError

    def penalty_view(self, wrapped: nn.Module, plain: nn.Module) -> nn.Module:
        """What a penalty differentiates twice through."""
        raise NotImplementedError

    def loss_scale(self, accelerator: Accelerator, wrapped: nn.Module) -> float | torch.Tensor | None:
        """The fp16 loss scale in force for ``wrapped`` (None without one)."""
        raise NotImplementedError

    def grads_inspectable(self, accelerator: Accelerator) -> bool:
        """Whether gradients can be checked between backward and the optimiser step."""
        raise NotImplementedError

    def grad_norm(self, accelerator: Accelerator, model: nn.Module, max_norm: float,
                  measure: bool) -> torch.Tensor | None:
        """Clip to ``max_norm`` when set; the pre-clip norm when clipping or measuring."""
        raise NotImplementedError

    def micro_batch(self, accelerator: Accelerator, models: list[nn.Module],
                    last: bool) -> AbstractContextManager[Any]:
        """Around one micro-batch's forward and backward (``last``: the accumulation's end)."""
        raise NotImplementedError

    def loss_for_backward(self, loss: torch.Tensor, accumulate: int) -> torch.Tensor:
        """The loss of one of ``accumulate`` micro-batches as this backend's backward wants it."""
        raise NotImplementedError

    def release(self, wrapped: list[nn.Module]) -> None:
        """Free what the wrapped networks hold before the process group goes (nothing by default)."""
