"""The one door to the private and undocumented attributes of the libraries dist_gan builds on.

Each is listed in ``PRIVATE_APIS`` with what it is used for, and reached only through the functions
here; tests/test_backend_private.py checks that every one still exists in the installed versions,
and that no other module of dist_gan touches a private attribute of a foreign library. After an
upgrade removes one, the error names it and its purpose instead of an AttributeError mid-step.
"""

from __future__ import annotations

from typing import Any

# (owner, where: a module or class path, attribute, why)
PRIVATE_APIS = (
    ("torch", "torch._C._distributed_c10d.Reducer", "_push_all_rebuilt_params", "fix DDP's buckets"),
    ("torch", "torch._C._distributed_c10d.Reducer", "_rebuild_buckets", "fix DDP's buckets"),
    ("torch", "torch.nn.parallel.DistributedDataParallel", "_has_rebuilt_buckets", "fix DDP's buckets"),
    ("accelerate", "accelerate.state.GradientState", "_set_sync_gradients",
     "tell DeepSpeed which micro-batch ends an accumulation"),
    ("torch", "torch.amp.GradScaler", "_get_scale_async", "read the fp16 loss scale without a host sync"),
    ("deepspeed", "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "loss_scale",
     "read a DeepSpeed engine's fp16 loss scale (ZeRO 1/2's optimizer, and stage 0's FP16_Optimizer)"),
    ("torch", "torch.optim.lr_scheduler.LRScheduler", "_last_lr",
     "make get_last_lr() report learning rates set from the config"),
    ("torch", "torch.optim.lr_scheduler.LambdaLR", "lr_lambdas", "rescale a schedule's base learning rate"),
    ("torch", "torch.optim.lr_scheduler.LRScheduler", "base_lrs", "rescale a schedule's base learning rate"),
    ("torch", "torch.optim.lr_scheduler.LRScheduler", "last_epoch", "rescale a schedule's base learning rate"),
    ("accelerate", "torch.nn.Module", "_original_forward",
     "take the autocast wrapper off a network without importing DeepSpeed"),
    ("torch", "torch._dynamo.eval_frame.OptimizedModule", "_orig_mod",
     "reach the eager module inside torch.compile (double backward needs it)"),
    ("torch", "torch", "_foreach_lerp_", "update the EMA and historical averages in one kernel per dtype"),
    ("torch", "torch", "_foreach_norm", "read a gradient norm without a clip pass"),
    ("accelerate", "accelerate.tracking", "LOGGER_TYPE_TO_CLASS", "build the trackers a run names"),
    ("accelerate", "accelerate.commands.config", "default_config_file",
     "find the launch profile accelerate launch uses by default"),
    ("python", "argparse.ArgumentParser", "_actions", "read accelerate launch's own option grammar"),
)
NAMES = frozenset(entry[2] for entry in PRIVATE_APIS)
_MISSING = object()


def _why(name: str) -> tuple[str, str]:
    owner, _, _, why = next(p for p in PRIVATE_APIS if p[2] == name)
    return owner, why


def private_api(obj: Any, name: str, default: Any = _MISSING) -> Any:
    """``obj.name`` for a listed attribute; ``default`` where the object may lack it by design (an
    uncompiled module has no ``_orig_mod``), else a missing one is an error naming its purpose."""
    if name not in NAMES:
        raise ValueError(f"{name} is not in PRIVATE_APIS: list it there, with why it is needed")
    try:
        return getattr(obj, name)
    except AttributeError:
        if default is not _MISSING:
            return default
        owner, why = _why(name)
        raise RuntimeError(f"{type(obj).__module__}.{type(obj).__name__} has no attribute {name}, which "
                           f"dist_gan uses to {why}: {owner} changed it; install the versions DEVELOPERS.md "
                           "pins, or report it") from None


def set_private(obj: Any, name: str, value: Any) -> None:
    """Set a listed attribute that ``obj`` already has (checked, so a rename is an error)."""
    private_api(obj, name)
    setattr(obj, name, value)


def drop_private(obj: Any, name: str) -> None:
    """Delete a listed instance attribute (e.g. Accelerate's forward wrapper)."""
    private_api(obj, name)
    delattr(obj, name)


def set_base_lr(scheduler: Any, base_lr: float) -> None:
    """Give a LambdaLR schedule a new base learning rate, the current step's factor applied to its
    optimiser's groups at once, and ``get_last_lr()`` reporting them."""
    lambdas, step = private_api(scheduler, "lr_lambdas"), private_api(scheduler, "last_epoch")
    set_private(scheduler, "base_lrs", [base_lr] * len(private_api(scheduler, "base_lrs")))
    for group, fn in zip(scheduler.optimizer.param_groups, lambdas):
        group["lr"] = base_lr * fn(step)
    set_private(scheduler, "_last_lr", [group["lr"] for group in scheduler.optimizer.param_groups])


def eager(module: Any) -> Any:
    """The uncompiled module behind a ``torch.compile`` wrapper (double backward needs eager mode),
    or ``module`` itself."""
    return private_api(module, "_orig_mod", default=module)
