"""The backend: one process, DDP or DeepSpeed; the precision each part runs in; how the networks are
prepared for it. Every rule that depends on the launch lives here, and this is the only module that
names DeepSpeed.

- **Accelerators**: one per network (``make_accelerators``). Under DeepSpeed each holds its network's
  engine (Accelerate's multi-model support: one plugin per model); otherwise the second shares the
  first's process group and keeps its own model list, grad scaler and checkpoint folder.
- **Preparing a network** (``prepare``, ``plain``, ``penalty_view``, ``use_channels_last``):
  the wrapped module for training forwards, the plain one behind it (sampling, EMA, checkpoints,
  frozen reads), and the one penalties differentiate twice through.
- **Precision**: training forwards run under the Accelerator's autocast; penalties in fp32
  (``full_precision``); a network whose weights were cast to bf16/fp16 (DeepSpeed's modes) still
  takes and gives fp32 (``accept_fp32_io``); gradients are read or clipped as the backend allows
  (``grad_norm``, ``grads_inspectable``).
- **Checkpoints**: whether a checkpoint written under one backend resumes under this one
  (``check_resumable``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import types
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dist_gan.config import Config, ConfigError, SpeedConfig

log = logging.getLogger(__name__)


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def shut_down(accelerator: Accelerator, wrapped: list[nn.Module]) -> None:
    """End a run's distributed state in one fixed order on every rank: wait for the other ranks
    (rank 0's last pictures included), let DeepSpeed engines drop their gradient hooks and buffers,
    then destroy the process group. Left to interpreter exit, the engines' destructors ran after the
    process group was gone, in whatever order garbage collection picked. (This order alone did not
    stop a rare SIGABRT in torch's C++ teardown after complete runs; ``dist_gan.train`` also skips
    that teardown in multi-process runs.)"""
    accelerator.wait_for_everyone()
    if is_deepspeed(accelerator):
        for module in wrapped:
            engine = getattr(module, "_orig_mod", module)  # under torch.compile, the engine inside
            if callable(getattr(engine, "destroy", None)):
                engine.destroy()
    accelerator.end_training()


def set_backend_flags(speed: SpeedConfig) -> None:
    """Process-wide numerics switches for CUDA (TF32, cuDNN autotuning); no effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = speed.tf32
    torch.backends.cudnn.allow_tf32 = speed.tf32
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark


def _deepspeed_plugins(config: Config) -> dict:
    """One DeepSpeed plugin per network from the launcher's settings (``accelerate launch
    --config_file launch/deepspeed_zero2.yaml``), with what a run without a prepared DataLoader must
    fix itself: the micro batch, the accumulation steps (``optim.accumulate``), the clipping threshold."""
    from accelerate.utils import DeepSpeedPlugin

    plugins = {}
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
        half = _deepspeed_half_precision(ds, resolve_mixed_precision(config)
                                         or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
        if half:
            # DeepSpeed casts only the parameters to bf16/fp16; BatchNorm's running statistics and
            # spectral norm's vectors must follow, or every such layer meets mixed dtypes.
            ds.setdefault("data_types", {}).setdefault("buffer_dtype", half)
        plugins[name] = plugin
    return plugins


def _deepspeed_half_precision(ds: dict, mixed_precision: str) -> str | None:
    """"bf16" or "fp16" when this DeepSpeed config trains in it, else None ("auto" follows the run)."""
    for key in ("bf16", "fp16"):
        enabled = ds.get(key, {}).get("enabled", False)
        if enabled is True or (enabled == "auto" and mixed_precision == key):
            return key
    return None


# What `accelerate launch` was asked for. Accelerate passes no trace of its launch profile to the
# processes it starts: a run launched with launch/gpu_ddp.yaml on a machine without GPUs looks exactly
# like one launched with launch/cpu_ddp.yaml and silently trains N processes on the CPU. The profile is
# only in the launcher's arguments, so on Linux they are read from /proc (the launcher is this
# process's parent: torchrun's agent runs inside `accelerate launch`). Elsewhere, or under another
# launcher, nothing is known and nothing is checked.
_GPU_TYPES = {"MULTI_GPU", "DEEPSPEED", "FSDP"}
# The classes DeepSpeed's ZeRO optimizer partitions pickle (DeepSpeed loads them with
# weights_only=False; checkpoint.refuse_code_in_pickles admits these and nothing else callable)
BACKEND_PICKLE_GLOBALS = ("deepspeed.utils.tensor_fragment.fragment_address",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.runtime.fp16.loss_scaler.LossScaler")
# accelerate launch's options that take no value; every other option takes the next argument as its
# value unless that argument is an option itself (--main_process_port 0 --config_file X.yaml)
_BOOLEAN_FLAGS = {"--cpu", "--use_cpu", "--multi_gpu", "--tpu", "--use_deepspeed", "--use_fsdp",
                  "--use_megatron_lm", "--use_xpu", "-q", "--quiet", "--no_python", "--debug",
                  "--same_network", "--downcast_bf16", "--enable_cpu_affinity", "--ipex"}


@dataclass(frozen=True)
class LaunchRequest:
    """The parts of an ``accelerate launch`` invocation that say which devices it wants."""

    profile: Path | None          # the --config_file, or Accelerate's default config when it exists
    settings: dict                # that profile's YAML (empty without one)
    flags: tuple[str, ...]        # the launcher's own options, before the training module or script

    def wants_gpu(self, environ: dict[str, str]) -> str | None:
        """Why this launch needs a GPU ("distributed_type: MULTI_GPU", ...), or None when it does not."""
        flag_values = dict(zip(self.flags, self.flags[1:]))
        if "--cpu" in self.flags or "--use_cpu" in self.flags or self.settings.get("use_cpu"):
            return None
        if "--multi_gpu" in self.flags:
            return "--multi_gpu"
        kind = str(self.settings.get("distributed_type", ""))
        if kind == "DEEPSPEED" and environ.get("DS_ACCELERATOR", "").lower() == "cpu":
            return None  # DeepSpeed's CPU accelerator, as the tests and the profile header use it
        if kind in _GPU_TYPES:
            return f"distributed_type: {kind}"
        gpu_ids = flag_values.get("--gpu_ids", flag_values.get("--gpu-ids", self.settings.get("gpu_ids")))
        if gpu_ids not in (None, "all", ""):
            return f"gpu_ids: {gpu_ids}"
        return None


def parse_launch(argv: list[str], cwd: Path, default_profile: Path | None) -> LaunchRequest | None:
    """The launch request in an ``accelerate launch`` command line, or None if ``argv`` is not one."""
    start = None
    for i, arg in enumerate(argv[:-1]):
        if (Path(arg).name == "accelerate" and argv[i + 1] == "launch") or arg == "accelerate.commands.launch":
            start = i + (2 if argv[i + 1] == "launch" else 1)
            break
    if start is None:
        return None
    flags: list[str] = []
    rest = argv[start:]
    i = 0
    while i < len(rest) and rest[i].startswith("-") and rest[i] not in ("-m", "--module"):
        name, has_value, value = rest[i].partition("=")
        flags.append(name)
        if has_value:
            flags.append(value)
        elif name not in _BOOLEAN_FLAGS and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
            flags.append(rest[i + 1])
            i += 1
        i += 1
    values = dict(zip(flags, flags[1:]))
    named = values.get("--config_file", values.get("--config-file"))
    profile = (cwd / named) if named else default_profile
    settings: dict = {}
    if profile is not None and profile.is_file():
        settings = yaml.safe_load(profile.read_text()) or {}
    elif not named:
        profile = None
    return LaunchRequest(profile=profile, settings=settings, flags=tuple(flags))


def current_launch() -> LaunchRequest | None:
    """The ``accelerate launch`` that started this process (searched up to three ancestors), if any."""
    from accelerate.commands.config import default_config_file

    default = Path(default_config_file)
    pid = os.getppid()
    for _ in range(3):
        proc = Path("/proc") / str(pid)
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            cwd = Path(os.readlink(proc / "cwd"))
            request = parse_launch(argv, cwd, default if default.is_file() else None)
            if request is not None:
                return request
            pid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 1:
            return None
    return None


def refuse_gpu_launch_without_gpu() -> None:
    """One line, not N processes silently training on the CPU, when the launch profile asks for GPUs
    that torch cannot see (a GPU profile on a laptop, or a CPU-only build of torch on a GPU node)."""
    request = current_launch()
    reason = request.wants_gpu(dict(os.environ)) if request is not None else None
    if reason is not None:
        where = f"launch profile {request.profile}" if request.profile else "this accelerate launch"
        cpu_way = ("DS_ACCELERATOR=cpu to run DeepSpeed on the CPU" if "DEEPSPEED" in reason else
                   "--config_file launch/cpu_ddp.yaml (or launch/cpu_single.yaml) to train on the CPU")
        why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else
               f"torch {torch.__version__} sees no GPU (driver, CUDA_VISIBLE_DEVICES)")
        raise ConfigError(f"{where} asks for GPUs ({reason}) but {why}: launch with {cpu_way}")


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
    common = dict(mixed_precision=resolve_mixed_precision(config), step_scheduler_with_optimizer=False)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        try:
            importlib.import_module("deepspeed")
        except ImportError as err:
            raise ConfigError(f"this launch uses DeepSpeed (ACCELERATE_USE_DEEPSPEED=true, e.g. "
                              f"launch/deepspeed_zero2.yaml) but it cannot be imported ({err}): "
                              "pip install -e '.[deepspeed]', or launch with launch/cpu_ddp.yaml or "
                              "launch/gpu_ddp.yaml") from None
        if config.loss.name == "wgan":
            raise ConfigError("loss.name=wgan clips D's weights in place, which ZeRO's own fp32 copy "
                              "undoes: use wgan_gp under DeepSpeed")
        if config.model.encoder.arch != "none":
            raise ConfigError("model.encoder (VAE-GAN) trains a third network with G, and one "
                              "DeepSpeed engine holds one model: use DDP for VAE-GAN")
        from accelerate.utils import InitProcessGroupKwargs

        # On a GPU-less host Accelerate finds no backend for DeepSpeed and every rank would think
        # it is alone; DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) speaks gloo.
        handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
        acc_G = Accelerator(deepspeed_plugins=_deepspeed_plugins(config), kwargs_handlers=handlers,
                            **common)
    else:
        # cpu=True on a GPU-less host: Accelerate otherwise ignores the launcher's WORLD_SIZE there and
        # every process trains alone (accelerate launch --config_file with use_cpu, torchrun).
        acc_G = Accelerator(cpu=not torch.cuda.is_available(), **common)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc_G.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate formed a group "
            f"of {acc_G.num_processes} ({acc_G.distributed_type}); on CPU launch with "
            "--config_file launch/cpu_ddp.yaml (`--cpu --num_processes N` starts one process)")
    acc_D = Accelerator(**common) if is_deepspeed(acc_G) else Accelerator(
        cpu=not torch.cuda.is_available(), **common)
    return acc_G, acc_D


def make_accelerator(config: Config) -> Accelerator:
    """One Accelerator for both networks (benchmarks, tools): enough where nothing is checkpointed."""
    return make_accelerators(config)[0]


def use_channels_last(config: Config, accelerator: Accelerator) -> bool:
    """NHWC memory for the conv nets when asked, but never under DeepSpeed, which flattens
    parameters through views that need the standard contiguous layout."""
    if not config.speed.channels_last or is_deepspeed(accelerator):
        return False
    # A conv weight with one input or output channel (grey images) has two valid stride patterns for
    # the same memory; DDP warns when grad and bucket pick different ones. Nothing is wrong.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return True


def prepare(accelerator: Accelerator, name: str, *objects: Any, fixed_buckets: bool = True) -> tuple:
    """``accelerator.prepare(*objects)`` for network ``name`` ("G" or "D"), whose DeepSpeed plugin is
    selected first when there is one; DDP's buckets fixed now (``fixed_buckets``, see ``fix_buckets``)."""
    if is_deepspeed(accelerator):
        accelerator.state.select_deepspeed_plugin(name)
    prepared = accelerator.prepare(*objects)
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    if fixed_buckets:
        for wrapped in prepared:
            if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
                fix_buckets(wrapped)
    return prepared


# Private attributes of the libraries we build on that dist_gan uses, each through ``private_api`` only
# (one door each): (owner, class, attribute, why). tests/test_backend_private.py checks that every one
# still exists in the installed versions.
PRIVATE_APIS = (
    ("torch", "torch._C._distributed_c10d.Reducer", "_push_all_rebuilt_params", "fix DDP's buckets"),
    ("torch", "torch._C._distributed_c10d.Reducer", "_rebuild_buckets", "fix DDP's buckets"),
    ("accelerate", "accelerate.state.GradientState", "_set_sync_gradients",
     "tell DeepSpeed which micro-batch ends an accumulation"),
    ("torch", "torch.amp.GradScaler", "_get_scale_async", "read the fp16 loss scale without a host sync"),
    ("torch", "torch.optim.lr_scheduler.LRScheduler", "_last_lr",
     "make get_last_lr() report learning rates set from the config"),
    ("accelerate", "torch.nn.Module", "_original_forward",
     "take the autocast wrapper off a network without importing DeepSpeed"),
)


def private_api(obj: Any, name: str) -> Any:
    """``obj.name``, one of the private attributes in ``PRIVATE_APIS``; gone after an upgrade, it is an
    error naming it and what it was for, instead of an AttributeError in the middle of a step."""
    try:
        return getattr(obj, name)
    except AttributeError:
        owner, _, _, why = next((p for p in PRIVATE_APIS if p[2] == name), ("a library", "", name, "?"))
        raise RuntimeError(f"{type(obj).__module__}.{type(obj).__name__} has no attribute {name}, which "
                           f"dist_gan uses to {why}: {owner} changed it; install the versions DEVELOPERS.md "
                           "pins, or report it") from None


def set_last_lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Make ``scheduler.get_last_lr()`` report its optimiser's current learning rates (set directly)."""
    private_api(scheduler, "_last_lr")  # present: the assignment below is what get_last_lr reads
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


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
    ddp._has_rebuilt_buckets = True


@contextlib.contextmanager
def micro_batch(accelerator: Accelerator, models: list[nn.Module], last: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: DDP's ``no_sync`` on all but the last (their
    gradients accumulate locally, one all-reduce at the end); DeepSpeed told whether this is the
    accumulation boundary, where its engine reduces and steps."""
    if is_deepspeed(accelerator):
        set_sync = private_api(accelerator.gradient_state, "_set_sync_gradients")
        set_sync(last)
        try:
            yield
        finally:
            set_sync(True)
        return
    with contextlib.ExitStack() as stack:
        if not last:
            for model in models:
                stack.enter_context(accelerator.no_sync(model))
        yield


def backward(accelerator: Accelerator, loss: torch.Tensor, accumulate: int) -> None:
    """Backward of one of ``accumulate`` micro-batches' loss (DeepSpeed divides by its own
    gradient_accumulation_steps, set to the same number)."""
    accelerator.backward(loss if is_deepspeed(accelerator) else loss / accumulate)


def plain(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """The network behind its DDP/DeepSpeed wrapper, with the autocast wrapper ``prepare`` put on its
    forward taken off in place (the wrapped module loses it too): precision is decided where the loss
    says (penalties run in fp32), not forced on every call.

    A DeepSpeed or compiled network goes through ``accelerator.unwrap_model``. Otherwise DDP is the
    only wrapper, taken off here: ``unwrap_model`` imports DeepSpeed whenever it is installed, to rule
    out its engine, and that import (with torch._dynamo) is about 2 s of every process's start."""
    if is_deepspeed(accelerator) or module is not eager(module):
        return accelerator.unwrap_model(module, keep_fp32_wrapper=False)
    while isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    if "_original_forward" in vars(module):  # set by prepare under mixed precision
        drop_autocast_forward(module)
    return module


def drop_autocast_forward(module: nn.Module) -> None:
    """Give ``module`` back the forward Accelerate's mixed-precision wrapper replaced (as
    ``unwrap_model(keep_fp32_wrapper=False)`` does)."""
    original = private_api(module, "_original_forward")
    del module._original_forward
    forward = module.forward
    while hasattr(forward, "__wrapped__") and forward != original:
        forward = forward.__wrapped__
    module.forward = original if forward == original else types.MethodType(forward, module)


def eager(module: nn.Module) -> nn.Module:
    """The uncompiled module behind a ``torch.compile`` wrapper (double backward needs eager mode)."""
    return getattr(module, "_orig_mod", module)


def penalty_view(accelerator: Accelerator, wrapped: nn.Module, plain_module: nn.Module) -> nn.Module:
    """What a penalty differentiates twice through: the eager wrapped module (DDP then sees the
    penalty's gradient), or under DeepSpeed the plain one, as an engine's hooks cannot run inside
    ``autograd.grad``."""
    return plain_module if is_deepspeed(accelerator) else eager(wrapped)


def loss_scale(accelerator: Accelerator, wrapped: nn.Module) -> float | torch.Tensor | None:
    """The fp16 loss scale in force for ``wrapped`` (None without one): the native scaler's as a
    device tensor (reading it as a number would sync), or the DeepSpeed engine's fp16 scale."""
    if accelerator.scaler is not None:
        return private_api(accelerator.scaler, "_get_scale_async")()
    if is_deepspeed(accelerator) and wrapped.fp16_enabled():
        return getattr(wrapped.optimizer, "cur_scale", None)
    return None


def full_precision(device: torch.device) -> AbstractContextManager:
    """Autocast off: penalties that differentiate through D run in fp32 whatever the run's mixed
    precision (a half-precision gradient norm is too coarse, and its square overflows fp16)."""
    return torch.autocast(device_type=device.type, enabled=False)


def grads_inspectable(accelerator: Accelerator) -> bool:
    """Whether gradients can be checked between backward and the optimiser step: not under
    DeepSpeed (the engine steps inside ``backward``) nor with an fp16 grad scaler (which skips
    inf/NaN gradients itself, routinely)."""
    return accelerator.scaler is None and not is_deepspeed(accelerator)


def grad_norm(accelerator: Accelerator, model: nn.Module, max_norm: float,
               measure: bool) -> torch.Tensor | None:
    """Clip to ``max_norm`` when it is set; return the pre-clip norm when clipping or measuring.

    Under DeepSpeed the engine clips (``gradient_clipping``) and steps inside ``backward``; this then
    reads the norm it computed. Without clipping or a grad scaler the norm is read directly (no
    clip pass over the gradients, which costs as much again).
    """
    if is_deepspeed(accelerator):
        if not measure:
            return None
        norm = accelerator.clip_grad_norm_(model.parameters(), math.inf)
        return torch.as_tensor(float("nan") if norm is None else float(norm))
    if max_norm > 0 or (measure and accelerator.scaler is not None):  # the scaler must unscale first
        return accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    if measure:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=accelerator.device)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return None


def check_resumable(path: Any, manifest: dict, accelerator: Accelerator) -> None:
    """Refuse a checkpoint whose optimizer state this launch cannot read: ZeRO partitions are per
    rank and per DeepSpeed launch."""
    deepspeed = "DEEPSPEED" in manifest["distributed_type"] or is_deepspeed(accelerator)
    if deepspeed and manifest["world_size"] != accelerator.num_processes:
        raise ConfigError(
            f"checkpoint {path} was written by {manifest['world_size']} DeepSpeed processes and this "
            f"run has {accelerator.num_processes}: ZeRO optimizer partitions are per rank; resume with "
            f"{manifest['world_size']} processes")
    if deepspeed and manifest["distributed_type"] != str(accelerator.distributed_type):
        raise ConfigError(f"checkpoint {path} was written under {manifest['distributed_type']} "
                          f"and this run is {accelerator.distributed_type}: resume under the same one")


def _weight_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _inputs_to_weight_dtype(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    dtype = _weight_dtype(module)
    if dtype == torch.float32:
        return None
    return _cast(args, dtype), {key: _cast(value, dtype) for key, value in kwargs.items()}


def _outputs_to_fp32(module: nn.Module, args: tuple, output: Any) -> Any:
    return None if _weight_dtype(module) == torch.float32 else _cast(output, torch.float32)


def accept_fp32_io(module: nn.Module) -> nn.Module:
    """Let ``module`` take and give fp32 tensors whatever its weights' dtype, in place.

    DeepSpeed's bf16/fp16 modes cast the weights themselves (autocast does not); then floating
    inputs (z, images, the penalty's interpolates) are cast to the weights' dtype on the way in, and
    floating outputs to fp32 on the way out, so losses, penalties and metrics stay in fp32. With fp32
    weights (every other mode) both hooks do nothing.
    """
    module.register_forward_pre_hook(_inputs_to_weight_dtype, with_kwargs=True)
    module.register_forward_hook(_outputs_to_fp32)
    return module
