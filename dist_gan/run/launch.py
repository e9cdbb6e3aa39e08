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
from pathlib import Path

from dist_gan.run.launcher import OUTPUT_ENV, STATUS_DIR_ENV, one_process_problem, split_arguments
from dist_gan.run.stop import PREEMPTED_EXIT_CODE, STOP_SIGNALS


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
