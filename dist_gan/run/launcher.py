"""Reading an ``accelerate launch`` command line, with one grammar: Accelerate's own launch parser
says which options take no value. Used for ``dist-gan launch``'s own arguments (``run.launch``) and
for the launch that started a training process, read from /proc (``current_launch``: a GPU profile
on a machine without one is refused in one line)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from dist_gan.config import ConfigError
from dist_gan.core.private_api import private_api


def default_profile() -> Path | None:
    """The launch profile ``accelerate launch`` uses without --config_file, when there is one."""
    import accelerate.commands.config

    default = Path(private_api(accelerate.commands.config, "default_config_file"))
    return default if default.is_file() else None


OUTPUT_ENV, STATUS_DIR_ENV = "DIST_GAN_OUTPUT", "DIST_GAN_STATUS_DIR"
_VALUE_OPTIONS_END = (".yaml", ".yml")


@lru_cache(maxsize=1)
def valueless_options() -> frozenset[str]:
    """``accelerate launch``'s options that take no value (``--cpu``, ``--multi_gpu``, ...), read
    from its own parser, so an option before the config is never taken to consume it."""
    from accelerate.commands.launch import launch_command_parser

    return frozenset(name for action in private_api(launch_command_parser(), "_actions") if action.nargs == 0
                     for name in action.option_strings)


def distributed_flags() -> frozenset[str]:
    """The value-less options that choose a several-process mode (--multi_gpu, --use_<backend>)."""
    return frozenset(name for name in valueless_options()
                     if name.startswith(("--multi", "--use_", "--use-")) and "cpu" not in name)


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch's arguments, dist_gan.train's): the training config is the first argument
    ending in .yaml/.yml that is not the value of an option (``--config_file X.yaml``)."""
    for i, arg in enumerate(argv):
        previous = argv[i - 1] if i else ""
        is_option_value = (previous.startswith("-") and "=" not in previous and previous != "--"
                           and previous not in valueless_options())
        if arg.endswith(_VALUE_OPTIONS_END) and not arg.startswith("-") and not is_option_value:
            return argv[:i], argv[i:]
    raise SystemExit("dist-gan launch: error: name the training config (CONFIG.yaml) after the launcher's "
                     "options, e.g. dist-gan launch --config_file launch/cpu_ddp.yaml configs/mnist_wgangp.yaml")


# Accelerate's distributed types that start one process, whatever --num_processes says
_ONE_PROCESS_TYPES = ("NO", "MULTI_CPU")


def _option(argv: list[str], *names: str) -> str | None:
    """The value of the last of ``names`` in ``argv`` (``--name value`` or ``--name=value``)."""
    found = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif arg.startswith(name + "="):
                found = arg.split("=", 1)[1]
    return found


def one_process_problem(launch_args: list[str]) -> str | None:
    """Why ``--num_processes N`` (N > 1) would start only one process, or None: Accelerate starts
    several only in a distributed mode (from a flag or the launch profile)."""
    wanted = _option(launch_args, "--num_processes", "--num-processes")
    if wanted is None or not wanted.isdigit() or int(wanted) < 2:
        return None
    if any(arg in distributed_flags() for arg in launch_args):
        return None
    profile = _option(launch_args, "--config_file", "--config-file")
    if profile is None:
        profile = str(default_profile()) if default_profile() is not None else None
    kind = "NO"
    if profile is not None:
        try:
            kind = str((yaml.safe_load(Path(profile).read_text()) or {}).get("distributed_type", "NO"))
        except (OSError, yaml.YAMLError):
            return None  # accelerate launch names the unreadable profile itself
    if kind.upper() not in _ONE_PROCESS_TYPES:
        return None
    where = f"the launch profile {profile} says distributed_type: {kind}" if profile else "no launch profile"
    return (f"--num_processes {wanted} with {where} starts ONE process; add --multi_gpu (GPUs), or "
            "--config_file launch/cpu_ddp.yaml (CPU processes on gloo), or a profile whose "
            "distributed_type starts several (MULTI_GPU and the ZeRO / FSDP ones)")


_GPU_TYPES = {"MULTI_GPU", "DEEPSPEED", "FSDP"}
# What `accelerate launch` was asked for. Accelerate passes no trace of its launch profile to the
# processes it starts: a run launched with launch/gpu_ddp.yaml on a machine without GPUs looks exactly
# like one launched with launch/cpu_ddp.yaml and silently trains N processes on the CPU. The profile is
# only in the launcher's arguments, so on Linux they are read from /proc (the launcher is this
# process's parent: torchrun's agent runs inside `accelerate launch`). Elsewhere, or under another
# launcher, nothing is known and nothing is checked.
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
        elif name not in valueless_options() and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
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
    default = default_profile()
    pid = os.getppid()
    for _ in range(3):
        proc = Path("/proc") / str(pid)
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            cwd = Path(os.readlink(proc / "cwd"))
            request = parse_launch(argv, cwd, default)
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
    import torch  # here: dist_gan.train reads this module before the slow imports

    request = current_launch()
    reason = request.wants_gpu(dict(os.environ)) if request is not None else None
    if request is not None and reason is not None:
        where = f"launch profile {request.profile}" if request.profile else "this accelerate launch"
        cpu_way = ("DS_ACCELERATOR=cpu to run DeepSpeed on the CPU" if "DEEPSPEED" in reason else
                   "--config_file launch/cpu_ddp.yaml (or launch/cpu_single.yaml) to train on the CPU")
        why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else
               f"torch {torch.__version__} sees no GPU (driver, CUDA_VISIBLE_DEVICES)")
        raise ConfigError(f"{where} asks for GPUs ({reason}) but {why}: launch with {cpu_way}")
