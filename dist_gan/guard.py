"""The divergence guard's bookkeeping: bad steps in a row, skipped updates, rollbacks, checkpoint health.

The loop reports each step (``record``); the guard says whether the run goes on, must roll back or
stop, whether a checkpoint may be written now (never inside a bad streak), and whether the one being
written is healthy (no skipped update since the previous one), that is, a rollback target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dist_gan.config import TrainConfig

log = logging.getLogger(__name__)

GO_ON, ROLL_BACK, STOP = "go_on", "roll_back", "stop"


@dataclass
class DivergenceGuard:
    """``train.max_bad_steps`` bad steps in a row end in ``train.on_divergence`` (stop or roll back,
    at most ``train.max_rollbacks`` times)."""

    cfg: TrainConfig
    in_row: int = 0
    skipped: int = 0  # skipped steps over the run (logged as skipped_steps)
    since_checkpoint: int = 0
    rollbacks: int = 0
    last_bad: dict[str, float] = field(default_factory=dict)

    @property
    def streak_open(self) -> bool:
        """A bad streak is going on: weights may be poisoned, so no checkpoint now."""
        return self.in_row > 0

    def record(self, step: int, applied: bool, losses: dict[str, float]) -> str:
        """Count a step (``applied``: every update of it went through); GO_ON, ROLL_BACK or STOP."""
        if applied:
            self.in_row = 0
            return GO_ON
        self.in_row, self.skipped, self.since_checkpoint = self.in_row + 1, self.skipped + 1, \
            self.since_checkpoint + 1
        self.last_bad = losses
        log.warning("step %d: non-finite loss or gradient %s, update skipped (%d in a row)",
                    step, losses, self.in_row)
        if self.in_row < self.cfg.max_bad_steps:
            return GO_ON
        if self.cfg.on_divergence == "rollback" and self.rollbacks < self.cfg.max_rollbacks:
            return ROLL_BACK
        return STOP

    def message(self, step: int) -> str:
        return (f"training diverged: {self.in_row} steps in a row with a non-finite loss or gradient, "
                f"the last at step {step} ({self.last_bad})")

    def why_stopped(self, target: object | None) -> str:
        """Why a rollback was not possible, for the final error ("" when the config said stop)."""
        if self.cfg.on_divergence == "stop":
            return ""
        if target is None:
            return "; no checkpoint to roll back to"
        return f"; {self.rollbacks} rollbacks (train.max_rollbacks) spent"

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.in_row = self.since_checkpoint = 0

    def checkpointed(self) -> bool:
        """A checkpoint is being written now: whether it is healthy (no skipped update since the last)."""
        healthy = self.since_checkpoint == 0
        self.since_checkpoint = 0
        return healthy
