"""Pre-emption signals: SIGUSR1/SIGTERM become "checkpoint after this step and exit 75".

Standard library only, so ``dist_gan.train`` can install the handler before the slow imports and
the config load: a signal at any moment of start-up still ends in a checkpoint and status 75.
"""

from __future__ import annotations

import logging
import signal

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
