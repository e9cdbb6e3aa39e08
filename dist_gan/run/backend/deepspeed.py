"""The DeepSpeed strategy: one ZeRO 1/2 engine per network (Accelerate's multi-model support), the
engine stepping inside ``backward``, its own clipping, fp16 scaling and bf16/fp16 weights. The only
module that knows DeepSpeed's configuration and classes."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch
import torch.nn as nn
from accelerate import Accelerator

from dist_gan.config import Config, ConfigError
from dist_gan.core.private_api import eager, private_api
from dist_gan.run.backend.strategy import Strategy

# The classes DeepSpeed's ZeRO optimizer partitions pickle (DeepSpeed loads them with
# weights_only=False; checkpoint.refuse_code_in_pickles admits these and nothing else callable)
PICKLE_GLOBALS = ("deepspeed.utils.tensor_fragment.fragment_address",
                  "deepspeed.runtime.zero.config.ZeroStageEnum",
                  "deepspeed.runtime.fp16.loss_scaler.LossScaler")


def plugins(config: Config, mixed_precision: str) -> dict:
    """One DeepSpeed plugin per network from the launcher's settings (``accelerate launch
    --config_file launch/deepspeed_zero2.yaml``), with what a run without a prepared DataLoader must
    fix itself: the micro batch, the accumulation steps (``optim.accumulate``), the clipping threshold."""
    from accelerate.utils import DeepSpeedPlugin

    found = {}
    for name in ("G", "D"):
        plugin = DeepSpeedPlugin()
        ds = plugin.deepspeed_config
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise ConfigError(f"DeepSpeed ZeRO stage {stage} is not supported for GANs (stages 0-2; "
                              "stage 3 partitions D's weights, which the gradient penalty needs whole)")
        ds["train_micro_batch_size_per_gpu"] = config.data.batch_size
        ds["gradient_accumulation_steps"] = config.optim.accumulate
        ds["gradient_clipping"] = config.optim.grad_clip
        ds.pop("train_batch_size", None)
        half = half_precision(ds, mixed_precision)
        if half:
            # DeepSpeed casts only the parameters to bf16/fp16; BatchNorm's running statistics and
            # spectral norm's vectors must follow, or every such layer meets mixed dtypes.
            ds.setdefault("data_types", {}).setdefault("buffer_dtype", half)
        found[name] = plugin
    return found


def half_precision(ds: dict, mixed_precision: str) -> str | None:
    """"bf16" or "fp16" when this DeepSpeed config trains in it, else None ("auto" follows the run)."""
    for key in ("bf16", "fp16"):
        enabled = ds.get(key, {}).get("enabled", False)
        if enabled is True or (enabled == "auto" and mixed_precision == key):
            return key
    return None


def refuse_unsupported(config: Config) -> None:
    """What one DeepSpeed engine per network cannot train, refused before anything is built."""
    if config.loss.name == "wgan":
        raise ConfigError("loss.name=wgan clips D's weights in place, which ZeRO's own fp32 copy "
                          "undoes: use wgan_gp under DeepSpeed")
    if config.model.encoder.arch != "none":
        raise ConfigError("model.encoder (VAE-GAN) trains a third network with G, and one "
                          "DeepSpeed engine holds one model: use DDP for VAE-GAN")


def requested() -> bool:
    """Whether the launcher asked for DeepSpeed (``accelerate launch`` with a DeepSpeed profile)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


class DeepSpeed(Strategy):
    name = "deepspeed"
    partitions_optimizer = True
    allows_channels_last = False  # engines flatten parameters through views of contiguous memory

    def prepare(self, accelerator: Accelerator, name: str, objects: tuple, fixed_buckets: bool) -> tuple:
        accelerator.state.select_deepspeed_plugin(name)
        prepared = accelerator.prepare(*objects)
        return prepared if isinstance(prepared, tuple) else (prepared,)

    def plain(self, accelerator: Accelerator, module: nn.Module) -> nn.Module:
        return accelerator.unwrap_model(module, keep_fp32_wrapper=False)

    def penalty_view(self, wrapped: nn.Module, plain: nn.Module) -> nn.Module:
        """The plain module: an engine's hooks cannot run inside ``autograd.grad``."""
        return plain

    def loss_scale(self, accelerator: Accelerator, wrapped: nn.Module) -> float | torch.Tensor | None:
        if accelerator.scaler is not None:
            return private_api(accelerator.scaler, "_get_scale_async")()
        if callable(fp16 := getattr(wrapped, "fp16_enabled", None)) and fp16():
            return private_api(wrapped.optimizer, "loss_scale")
        return None

    def grads_inspectable(self, accelerator: Accelerator) -> bool:
        """Never: the engine steps inside ``backward``."""
        return False

    def grad_norm(self, accelerator: Accelerator, model: nn.Module, max_norm: float,
                  measure: bool) -> torch.Tensor | None:
        """The engine clips (``gradient_clipping``) and steps inside ``backward``; this reads the norm
        it computed."""
        if not measure:
            return None
        norm = accelerator.clip_grad_norm_(model.parameters(), math.inf)
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    @contextlib.contextmanager
    def micro_batch(self, accelerator: Accelerator, models: list[nn.Module], last: bool) -> Iterator[None]:
        """The engine told whether this is the accumulation boundary, where it reduces and steps."""
        set_sync = private_api(accelerator.gradient_state, "_set_sync_gradients")
        set_sync(last)
        try:
            yield
        finally:
            set_sync(True)

    def loss_for_backward(self, loss: torch.Tensor, accumulate: int) -> torch.Tensor:
        """As it is: the engine divides by its own gradient_accumulation_steps (the same number)."""
        return loss

    def release(self, wrapped: list[nn.Module]) -> None:
        """Let the engines drop their gradient hooks and buffers while the process group exists."""
        for module in wrapped:
            engine = eager(module)  # under torch.compile, the engine inside
            if callable(getattr(engine, "destroy", None)):
                engine.destroy()
