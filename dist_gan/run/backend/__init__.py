"""The backend: one process, DDP or DeepSpeed; the precision each part runs in; how the networks are
prepared for it. What differs between DDP and DeepSpeed is a ``Strategy`` (``backend.ddp``,
``backend.deepspeed``), picked here from the Accelerator: the rest of dist_gan calls these functions
and never asks which backend it is on.

- **Accelerators**: one per network (``make_accelerators``). Under DeepSpeed each holds its network's
  engine (Accelerate's multi-model support: one plugin per model); otherwise the second shares the
  first's process group and keeps its own model list, grad scaler and checkpoint folder.
- **Preparing a network** (``prepare``, ``plain``, ``penalty_view``, ``use_channels_last``):
  the wrapped module for training forwards, the plain one behind it (sampling, EMA, checkpoints,
  frozen reads), and the one penalties differentiate twice through.
- **Precision**: training forwards run under the Accelerator's autocast; penalties in fp32
  (``losses.full_precision``); a network whose weights were cast to bf16/fp16 (DeepSpeed's modes) still
  takes and gives fp32 (``models.base.accept_fp32_io``); gradients are read or clipped as the
  backend allows (``grad_norm``, ``grads_inspectable``).
- **Checkpoints**: whether a checkpoint written under one backend resumes under this one
  (``check_resumable``).
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dist_gan.config import Config, ConfigError, SpeedConfig
from dist_gan.run.backend import deepspeed
from dist_gan.run.backend.ddp import DDP
from dist_gan.run.backend.deepspeed import DeepSpeed
from dist_gan.run.backend.strategy import Strategy
from dist_gan.run.launcher import refuse_gpu_launch_without_gpu

log = logging.getLogger(__name__)

BACKEND_PICKLE_GLOBALS = deepspeed.PICKLE_GLOBALS
_STRATEGIES: dict[bool, Strategy] = {False: DDP(), True: DeepSpeed()}


def strategy(accelerator: Accelerator) -> Strategy:
    """The strategy of ``accelerator``'s launch."""
    return _STRATEGIES[accelerator.distributed_type == DistributedType.DEEPSPEED]


def shut_down(accelerator: Accelerator, wrapped: list[nn.Module]) -> None:
    """End a run's distributed state in one fixed order on every rank: wait for the other ranks,
    let the strategy free what its wrapped networks hold (DeepSpeed's engines), then destroy the
    process group, rather than leave the engines' destructors to run after the process group is gone,
    in whatever order garbage collection picks. (``dist_gan.train`` also skips torch's C++ teardown in
    multi-process runs, where it can abort after a complete run.)"""
    accelerator.wait_for_everyone()
    strategy(accelerator).release(wrapped)
    accelerator.end_training()


def set_backend_flags(speed: SpeedConfig) -> None:
    """Process-wide numerics switches for CUDA (TF32, cuDNN autotuning); no effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = speed.tf32
    torch.backends.cudnn.allow_tf32 = speed.tf32
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark


def resolve_mixed_precision(config: Config) -> str | None:
    """train.mixed_precision, else the launcher's; r3gan networks default to bf16 on a GPU (R3GAN's
    authors found fp16 harmful to it; fp16 is allowed, with a warning)."""
    chosen = config.train.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    r3gan = "r3gan" in (config.model.generator.arch, config.model.discriminator.arch)
    if r3gan and chosen is None and torch.cuda.is_available():
        log.info("r3gan: bf16 mixed precision on GPU by default (train.mixed_precision=no for fp32)")
        return "bf16"
    if r3gan and chosen == "fp16":
        log.warning("r3gan in fp16: R3GAN's authors found fp16 cripples its training; use bf16")
    return config.train.mixed_precision


def make_accelerators(config: Config) -> tuple[Accelerator, Accelerator]:
    """The generator's and the discriminator's Accelerator for this run.

    Refuses a launch that silently lost its other processes, and a loss DeepSpeed cannot run.
    """
    if not torch.cuda.is_available():
        refuse_gpu_launch_without_gpu()
    mixed_precision = resolve_mixed_precision(config)
    common: dict[str, Any] = dict(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False)
    # cpu=True on a GPU-less host: Accelerate otherwise ignores the launcher's WORLD_SIZE there and
    # every process trains alone (accelerate launch --config_file with use_cpu, torchrun).
    second: dict[str, Any] = dict(cpu=not torch.cuda.is_available())
    if deepspeed.requested():
        try:
            importlib.import_module("deepspeed")
        except ImportError as err:
            raise ConfigError(f"this launch uses DeepSpeed (ACCELERATE_USE_DEEPSPEED=true, e.g. "
                              f"launch/deepspeed_zero2.yaml) but it cannot be imported ({err}): "
                              "pip install -e '.[deepspeed]', or launch with launch/cpu_ddp.yaml or "
                              "launch/gpu_ddp.yaml") from None
        deepspeed.refuse_unsupported(config)
        from accelerate.utils import InitProcessGroupKwargs

        # On a GPU-less host Accelerate finds no backend for DeepSpeed and every rank would think
        # it is alone; DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) speaks gloo.
        handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
        acc_G = Accelerator(deepspeed_plugins=deepspeed.plugins(
            config, mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")),
            kwargs_handlers=handlers, **common)
        second = {}  # the engines' own process group
    else:
        acc_G = Accelerator(**second, **common)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc_G.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate formed a group "
            f"of {acc_G.num_processes} ({acc_G.distributed_type}); on CPU launch with "
            "--config_file launch/cpu_ddp.yaml (`--cpu --num_processes N` starts one process)")
    return acc_G, Accelerator(**second, **common)


def make_accelerator(config: Config) -> Accelerator:
    """One Accelerator for both networks (benchmarks, tools): enough where nothing is checkpointed."""
    return make_accelerators(config)[0]


def use_channels_last(config: Config, accelerator: Accelerator) -> bool:
    """NHWC memory for the conv nets when asked and the backend allows it."""
    if not config.speed.channels_last or not strategy(accelerator).allows_channels_last:
        return False
    # A conv weight with one input or output channel (grey images) has two valid stride patterns for
    # the same memory; DDP warns when grad and bucket pick different ones. Nothing is wrong.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return True


def prepare(accelerator: Accelerator, name: str, *objects: Any, fixed_buckets: bool = True) -> tuple:
    """``accelerator.prepare(*objects)`` for network ``name`` ("G" or "D"); DDP's buckets fixed now
    (``fixed_buckets``, see ``ddp.fix_buckets``), a DeepSpeed plugin selected first."""
    return strategy(accelerator).prepare(accelerator, name, objects, fixed_buckets)


def micro_batch(accelerator: Accelerator, models: list[nn.Module], last: bool) -> AbstractContextManager[Any]:
    """Around one micro-batch's forward and backward (``last``: where the gradients are reduced)."""
    return strategy(accelerator).micro_batch(accelerator, models, last)


def backward(accelerator: Accelerator, loss: torch.Tensor, accumulate: int) -> None:
    """Backward of one of ``accumulate`` micro-batches' loss."""
    accelerator.backward(strategy(accelerator).loss_for_backward(loss, accumulate))


def plain(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """The network behind its DDP/DeepSpeed wrapper, with the autocast wrapper ``prepare`` put on its
    forward taken off in place (the wrapped module loses it too): precision is decided where the loss
    says (penalties run in fp32), not forced on every call."""
    return strategy(accelerator).plain(accelerator, module)


def penalty_view(accelerator: Accelerator, wrapped: nn.Module, plain_module: nn.Module) -> nn.Module:
    """What a penalty differentiates twice through (DDP must see the penalty's gradient; an engine's
    hooks cannot run inside ``autograd.grad``)."""
    return strategy(accelerator).penalty_view(wrapped, plain_module)


def loss_scale(accelerator: Accelerator, wrapped: nn.Module) -> float | torch.Tensor | None:
    """The fp16 loss scale in force for ``wrapped`` (None without one)."""
    return strategy(accelerator).loss_scale(accelerator, wrapped)


def grads_inspectable(accelerator: Accelerator) -> bool:
    """Whether gradients can be checked between backward and the optimiser step: not under
    DeepSpeed (the engine steps inside ``backward``) nor with an fp16 grad scaler (which skips
    inf/NaN gradients itself, routinely)."""
    return strategy(accelerator).grads_inspectable(accelerator)


def grad_norm(accelerator: Accelerator, model: nn.Module, max_norm: float,
              measure: bool) -> torch.Tensor | None:
    """Clip to ``max_norm`` when it is set; return the pre-clip norm when clipping or measuring."""
    return strategy(accelerator).grad_norm(accelerator, model, max_norm, measure)


def check_resumable(path: Any, manifest: dict, accelerator: Accelerator) -> None:
    """Refuse a checkpoint whose optimizer state this launch cannot read: ZeRO partitions are per
    rank and per DeepSpeed launch."""
    partitioned = "DEEPSPEED" in manifest["distributed_type"] or strategy(accelerator).partitions_optimizer
    if partitioned and manifest["world_size"] != accelerator.num_processes:
        raise ConfigError(
            f"checkpoint {path} was written by {manifest['world_size']} DeepSpeed processes and this "
            f"run has {accelerator.num_processes}: ZeRO optimizer partitions are per rank; resume with "
            f"{manifest['world_size']} processes")
    if partitioned and manifest["distributed_type"] != str(accelerator.distributed_type):
        raise ConfigError(f"checkpoint {path} was written under {manifest['distributed_type']} "
                          f"and this run is {accelerator.distributed_type}: resume under the same one")


__all__ = ["BACKEND_PICKLE_GLOBALS", "check_resumable", "grad_norm",
           "grads_inspectable", "loss_scale", "make_accelerator", "make_accelerators", "micro_batch",
           "penalty_view", "plain", "prepare", "resolve_mixed_precision", "set_backend_flags", "shut_down",
           "strategy", "use_channels_last", "backward"]
