"""Pre-emption signals: SIGUSR1/SIGTERM become "checkpoint after this step and exit 75"; the
stop policy (max steps, time limit, signal) that decides the run's last step, and the save policy
that decides which steps write a checkpoint.

Standard library only, so ``dist_gan.train`` can install the handler before the slow imports and
the config load: a signal at any moment of start-up still ends in a checkpoint and status 75.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Exit status of a run stopped by SIGUSR1/SIGTERM after saving its checkpoint: "requeue me"
# (EX_TEMPFAIL from sysexits.h). A scheduler wrapper resubmits with --train.resume=auto.
PREEMPTED_EXIT_CODE = 75
# A scheduler sends these to every process of a job step (Slurm's time limit, `kill -- -PGID`, a
# container stop), the DataLoader's workers too: see data.loader.ignore_stop_signals.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Turns SIGUSR1/SIGTERM into a request the loop honours after its current step.

    The handler only records the signal (a handler must not log or do I/O), so a second signal
    during the checkpoint save changes nothing. Previous handlers come back on exit. Entered before
    anything slow starts (``dist_gan.train.main`` enters it before loading the config), so a signal
    during start-up is honoured after the first step too. Loader workers ignore these signals
    (``data.loader.ignore_stop_signals``) and leave them to this process.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook worker): no pre-emption support
            log.warning("not in the main thread: SIGUSR1/SIGTERM will not checkpoint before exiting")
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# What a run stopped by a signal reports as its reason: the signal's name, or SIGNAL on a rank that
# learnt of another rank's signal through the agreement.
PREEMPTION_REASONS = frozenset({sig.name for sig in STOP_SIGNALS} | {"SIGNAL"})


def is_preemption(reason: str) -> bool:
    """Whether a run that stopped for ``reason`` was pre-empted (checkpoint, then exit 75)."""
    return reason in PREEMPTION_REASONS


class StopPolicy:
    """When the run ends, and why: at ``max_steps``; at the first log step past ``time_limit_min``
    minutes; or after the step in which any rank received a stop signal (with several ranks, the
    first log step after it: ``agree_every_step`` false). ``any_rank(flag)`` is
    the loop's agreement (true on every rank if true on one), so all ranks stop at the same step.
    """

    def __init__(self, max_steps: int, time_limit_min: float, request: StopRequest, any_rank,
                 agree_every_step: bool = True) -> None:
        self.last_step, self.reason = max_steps, "max_steps"
        self.agree_every_step = agree_every_step
        self.request, self.any_rank = request, any_rank
        self._seen: bool | None = None  # what ``latch_signal`` saw this step
        self.time_limit_min = time_limit_min
        self.deadline = time.perf_counter() + time_limit_min * 60 if time_limit_min else None

    @property
    def preempted(self) -> bool:
        return is_preemption(self.reason)

    def latch_signal(self) -> bool:
        """Record for this step whether a stop signal has come, and return it: one process only (a
        flag read, no collective; ``after_step`` then acts on this same answer, so a signal arriving
        in between waits for the next step). Several processes: False, as a signal is agreed on at
        log steps only."""
        self._seen = self.agree_every_step and self.request.received is not None
        return self._seen

    def after_step(self, step: int, log_step: bool) -> None:
        """Move the last step here if the time is up (checked on log steps) or a signal came."""
        if log_step and self.deadline is not None and self.any_rank(time.perf_counter() > self.deadline):
            self.last_step, self.reason = step, "time_limit"
            log.info("train.time_limit_min=%s reached at step %d", self.time_limit_min, step)
        # With several ranks a signal is agreed on at log steps only: a collective per step would
        # make every step wait for the slowest rank's host. Pre-emption then waits at most one
        # log interval, well inside any scheduler's grace period.
        seen, self._seen = self._seen, None
        received = seen if seen is not None and self.agree_every_step else self.request.received is not None
        if (log_step or self.agree_every_step) and self.any_rank(received):
            self.last_step, self.reason = step, self.request.received or "SIGNAL"
            log.warning("%s received: checkpointing at step %d and exiting with status %d",
                        self.reason, step, PREEMPTED_EXIT_CODE)


@dataclass
class SavePolicy:
    """Which steps write a checkpoint: every ``every`` steps, the run's last step, a step whose
    evaluation found the best FID so far (``run.keep_best``), and the first step after a bad streak
    that deferred a save. Never while the divergence guard's bad streak is open: the save is owed."""

    every: int
    owed: bool = False

    def wanted(self, step: int, last: bool, best: bool) -> bool:
        """The one rule. Before the guard's review ``best`` says whether this step's evaluation
        could find a new best (so the review must come first); at the save, whether it did."""
        return step % self.every == 0 or last or self.owed or best

    def decide(self, step: int, last: bool, best: bool, streak_open: bool) -> bool:
        """Whether to save at ``step`` now; a wanted save inside a bad streak becomes owed."""
        wanted = self.wanted(step, last, best)
        if wanted and streak_open:
            log.warning("step %d: checkpoint deferred until the divergence guard's bad streak ends%s",
                        step, "; stopping without one" if last else "")
            self.owed = True
            return False
        self.owed = self.owed and not wanted
        return wanted

    def rolled_back(self) -> None:
        """The restored checkpoint is the save that was owed."""
        self.owed = False
