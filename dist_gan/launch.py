"""``dist-gan launch [ACCELERATE OPTIONS] CONFIG.yaml [--section.key=value ...]``: ``accelerate launch``
of ``dist_gan.train`` with the training run's own exit status and output.

Under a bare ``accelerate launch`` a run's one-line error is followed by the launcher's own traceback
(``CalledProcessError``), and a run stopped by SIGTERM after its checkpoint leaves the launcher with
status 143 instead of the run's 75 ("requeue me"). Here:

- the training processes write to this command's stdout and stderr directly (reopened by their
  /proc paths, named in ``DIST_GAN_OUTPUT``: Linux); only the launcher's own output passes through
  a filter that drops its traceback;
- every rank records its exit status in ``DIST_GAN_STATUS_DIR``; this command exits 75 if any rank
  stopped to be requeued, else with the first failing rank's status, else the launcher's;
- SIGTERM is forwarded to the launcher, which forwards it to the ranks; SIGUSR1 (which would kill
  the launcher and leave the ranks training on) goes to the ranks themselves, each of which records
  its pid in ``DIST_GAN_STATUS_DIR`` once it catches the stop signals;
- the launcher failing before any rank started (a missing ``--config_file``) shows its own error
  line; ``--num_processes N`` that would start one process (no distributed mode) is refused.

Everything before CONFIG.yaml goes to ``accelerate launch`` (e.g. ``--config_file
launch/cpu_ddp.yaml --num_processes 2``); CONFIG.yaml and what follows go to ``dist_gan.train``.
``accelerate launch -m dist_gan.train ...`` keeps working; this only makes its ending clean.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

import yaml

from dist_gan.stop import PREEMPTED_EXIT_CODE, STOP_SIGNALS

OUTPUT_ENV, STATUS_DIR_ENV = "DIST_GAN_OUTPUT", "DIST_GAN_STATUS_DIR"
_VALUE_OPTIONS_END = (".yaml", ".yml")


@lru_cache(maxsize=1)
def valueless_options() -> frozenset[str]:
    """``accelerate launch``'s options that take no value (``--cpu``, ``--multi_gpu``, ...), read
    from its own parser, so an option before the config is never taken to consume it."""
    from accelerate.commands.launch import launch_command_parser

    return frozenset(name for action in launch_command_parser()._actions if action.nargs == 0
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
        from accelerate.commands.config import default_config_file

        profile = default_config_file if Path(default_config_file).is_file() else None
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


def _filtered(stream, out, dropped: list[str]) -> None:
    """Copy the launcher's own output to ``out`` without its traceback (everything from its first
    "Traceback" on: the ranks write elsewhere, so what follows is the launcher's report of their
    exit) and without the elastic agent's log records; the dropped lines go to ``dropped``."""
    dropping = False
    for line in stream:
        dropping = dropping or line.startswith("Traceback (most recent call last)")
        if dropping or "torch/distributed/elastic/" in line:
            dropped.append(line)
            continue
        out.write(line)
        out.flush()


def rank_pids(directory: Path) -> list[int]:
    """The ranks that have started (and catch the stop signals) under this launcher."""
    pids = []
    for path in sorted(directory.glob("rank*.pid")):
        try:
            pids.append(int(path.read_text()))
        except (OSError, ValueError):
            continue  # being written
    return pids


class SignalRelay:
    """SIGTERM to the launcher (it forwards to its ranks); SIGUSR1 to every rank that has started,
    and to ranks that start later (a signal during start-up is kept until they are there)."""

    def __init__(self, proc: subprocess.Popen, status_dir: Path):
        self.proc, self.status_dir = proc, status_dir
        self.pending: list[int] = []
        self.delivered: set[tuple[int, int]] = set()
        self.lock = threading.Lock()

    def __call__(self, signum: int, _frame) -> None:
        if signum != signal.SIGUSR1:
            self.proc.send_signal(signum)
            return
        with self.lock:
            self.pending.append(signum)
        self.deliver()
        threading.Thread(target=self._until_every_rank_has_it, daemon=True).start()

    def deliver(self) -> None:
        with self.lock:
            for signum in self.pending:
                for pid in rank_pids(self.status_dir):
                    if (signum, pid) not in self.delivered:
                        self.delivered.add((signum, pid))
                        try:
                            os.kill(pid, signum)
                        except ProcessLookupError:
                            pass

    def _until_every_rank_has_it(self) -> None:
        """Ranks that start after the signal get it as soon as they record their pid."""
        while self.proc.poll() is None:
            self.deliver()
            time.sleep(0.1)


def launcher_error(dropped: list[str]) -> str:
    """The launcher's own error: the last line of its traceback."""
    lines = [line.strip() for line in dropped if line.strip() and not line.startswith(" ")]
    return lines[-1] if lines else "no output"


def read_statuses(directory: Path) -> list[int]:
    return [int(p.read_text() or 1) for p in sorted(directory.glob("rank*.status"))]


def final_status(launcher: int, ranks: list[int]) -> int:
    """75 if any rank stopped to be requeued; else the first failing rank's status; else the
    launcher's (a rank killed outright records nothing)."""
    if PREEMPTED_EXIT_CODE in ranks:
        return PREEMPTED_EXIT_CODE
    failed = [s for s in ranks if s != 0]
    if failed:
        return failed[0]
    return launcher if launcher >= 0 else 128 - launcher


def main(argv: list[str] | None = None) -> int:
    launch_args, train_args = split_arguments(sys.argv[2:] if argv is None else argv)
    problem = one_process_problem(launch_args)
    if problem:
        raise SystemExit(f"dist-gan launch: error: {problem}")
    with tempfile.TemporaryDirectory(prefix="dist_gan_status_") as status_dir:
        # the launcher's workers are started with close_fds: they reopen this process's streams by path
        outputs = f"/proc/{os.getpid()}/fd/1,/proc/{os.getpid()}/fd/2"
        env = dict(os.environ, **{OUTPUT_ENV: outputs, STATUS_DIR_ENV: status_dir})
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", "dist_gan.train",
               *train_args]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        relay = SignalRelay(proc, Path(status_dir))
        for signum in STOP_SIGNALS:
            signal.signal(signum, relay)
        dropped: list[str] = []
        _filtered(proc.stdout, sys.stderr, dropped)
        code = proc.wait()
        statuses = read_statuses(Path(status_dir))
        if code != 0 and not statuses and not rank_pids(Path(status_dir)):
            sys.stderr.write(f"dist-gan launch: error: accelerate launch failed before any rank started: "
                             f"{launcher_error(dropped)}\n")
        return final_status(code, statuses)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
