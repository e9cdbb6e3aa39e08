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
- SIGTERM and SIGUSR1 are forwarded to the launcher, which forwards them to the ranks.

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
from pathlib import Path

from dist_gan.stop import PREEMPTED_EXIT_CODE, STOP_SIGNALS

OUTPUT_ENV, STATUS_DIR_ENV = "DIST_GAN_OUTPUT", "DIST_GAN_STATUS_DIR"
_VALUE_OPTIONS_END = (".yaml", ".yml")


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch's arguments, dist_gan.train's): the training config is the first argument
    ending in .yaml/.yml that is not the value of an option (``--config_file X.yaml``)."""
    for i, arg in enumerate(argv):
        previous = argv[i - 1] if i else ""
        is_option_value = previous.startswith("-") and "=" not in previous and previous != "--"
        if arg.endswith(_VALUE_OPTIONS_END) and not arg.startswith("-") and not is_option_value:
            return argv[:i], argv[i:]
    raise SystemExit("dist-gan launch: error: name the training config (CONFIG.yaml) after the launcher's "
                     "options, e.g. dist-gan launch --config_file launch/cpu_ddp.yaml configs/mnist_wgangp.yaml")


def _filtered(stream, out) -> None:
    """Copy the launcher's own output to ``out`` without its traceback (everything from its first
    "Traceback" on: the ranks write elsewhere, so what follows is the launcher's report of their
    exit) and without the elastic agent's log records."""
    dropping = False
    for line in stream:
        dropping = dropping or line.startswith("Traceback (most recent call last)")
        if dropping or "torch/distributed/elastic/" in line:
            continue
        out.write(line)
        out.flush()


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
    with tempfile.TemporaryDirectory(prefix="dist_gan_status_") as status_dir:
        # the launcher's workers are started with close_fds: they reopen this process's streams by path
        outputs = f"/proc/{os.getpid()}/fd/1,/proc/{os.getpid()}/fd/2"
        env = dict(os.environ, **{OUTPUT_ENV: outputs, STATUS_DIR_ENV: status_dir})
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", "dist_gan.train",
               *train_args]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda s, _f: proc.send_signal(s))
        _filtered(proc.stdout, sys.stderr)
        code = proc.wait()
        return final_status(code, read_statuses(Path(status_dir)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
