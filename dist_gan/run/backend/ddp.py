"""The DDP strategy: one process, or DistributedDataParallel over gloo or NCCL (Accelerate's
``NO``, ``MULTI_CPU`` and ``MULTI_GPU``), with native autocast and grad scaling."""

from __future__ import annotations

import contextlib
import math
import types
from typing import Iterator

import torch
import torch.nn as nn
from accelerate import Accelerator

from dist_gan.core.private_api import drop_private, eager, private_api, set_private
from dist_gan.run.backend.strategy import Strategy


def fix_buckets(ddp: torch.nn.parallel.DistributedDataParallel) -> None:
    """Make DDP's bucket layout final now, in parameter order, instead of after the first backward.

    The all-reduce's ring sums an element in an order set by its position in its bucket, and DDP
    re-buckets once, after the first backward of each process's life: a run resumed at step k
    would reduce step k with the first layout while the uninterrupted run used the second, and
    differ in the last bit at 3+ processes (with 2, a + b is the same either way). This performs
    the re-bucketing DDP would do, from the full parameter list (what its own join hook does), so
    it never happens again.
    """
    private_api(ddp.reducer, "_push_all_rebuilt_params")()
    private_api(ddp.reducer, "_rebuild_buckets")()
    set_private(ddp, "_has_rebuilt_buckets", True)


def drop_autocast_forward(module: nn.Module) -> None:
    """Give ``module`` back the forward Accelerate's mixed-precision wrapper replaced (as
    ``unwrap_model(keep_fp32_wrapper=False)`` does)."""
    original = private_api(module, "_original_forward")
    drop_private(module, "_original_forward")
    forward = module.forward
    while hasattr(forward, "__wrapped__") and forward != original:
        forward = forward.__wrapped__
    module.forward = original if forward == original else types.MethodType(forward, module)


class DDP(Strategy):
    name = "ddp"

    def prepare(self, accelerator: Accelerator, name: str, objects: tuple, fixed_buckets: bool) -> tuple:
        prepared = accelerator.prepare(*objects)
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        if fixed_buckets:
            for wrapped in prepared:
                if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
                    fix_buckets(wrapped)
        return prepared

    def plain(self, accelerator: Accelerator, module: nn.Module) -> nn.Module:
        """DDP is the only wrapper, taken off here (a compiled network goes through
        ``unwrap_model``): ``unwrap_model`` imports DeepSpeed whenever it is installed, to rule out
        its engine, and that import (with torch's compiler) is about 2 s of every process's start."""
        if module is not eager(module):
            return accelerator.unwrap_model(module, keep_fp32_wrapper=False)
        while isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        if private_api(module, "_original_forward", default=None) is not None:  # prepare's, under AMP
            drop_autocast_forward(module)
        return module

    def penalty_view(self, wrapped: nn.Module, plain: nn.Module) -> nn.Module:
        """The eager wrapped module: DDP then sees the penalty's gradient."""
        return eager(wrapped)

    def loss_scale(self, accelerator: Accelerator, wrapped: nn.Module) -> float | torch.Tensor | None:
        """The native scaler's scale as a device tensor (reading it as a number would sync)."""
        if accelerator.scaler is None:
            return None
        return private_api(accelerator.scaler, "_get_scale_async")()

    def grads_inspectable(self, accelerator: Accelerator) -> bool:
        """Not with an fp16 grad scaler, which skips inf/NaN gradients itself, routinely."""
        return accelerator.scaler is None

    def grad_norm(self, accelerator: Accelerator, model: nn.Module, max_norm: float,
                  measure: bool) -> torch.Tensor | None:
        """Without clipping or a grad scaler the norm is read directly (no clip pass over the
        gradients, which costs as much again)."""
        if max_norm > 0 or (measure and accelerator.scaler is not None):  # the scaler must unscale first
            return accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
        if measure:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if not grads:
                return torch.zeros((), device=accelerator.device)
            return torch.linalg.vector_norm(torch.stack(private_api(torch, "_foreach_norm")(grads)))
        return None

    @contextlib.contextmanager
    def micro_batch(self, accelerator: Accelerator, models: list[nn.Module], last: bool) -> Iterator[None]:
        """``no_sync`` on all but the last: gradients accumulate locally, one all-reduce at the end."""
        with contextlib.ExitStack() as stack:
            if not last:
                for model in models:
                    stack.enter_context(accelerator.no_sync(model))
            yield

    def loss_for_backward(self, loss: torch.Tensor, accumulate: int) -> torch.Tensor:
        return loss / accumulate
