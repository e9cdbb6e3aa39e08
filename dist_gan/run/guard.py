"""The divergence guard's bookkeeping: bad steps in a row, skipped updates, rollbacks, checkpoint health.

Each step is counted on the device (``StepTally``: no host sync in the step); at log and checkpoint
steps the loop reads the tally, agreed over ranks, into ``DivergenceGuard.review``, which says
whether the run goes on, must roll back or stop, whether a checkpoint may be written now (never
inside a bad streak), and whether the one being written is healthy (no skipped update since the
previous one), that is, a rollback target.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

import torch

from dist_gan.config import TrainConfig

log = logging.getLogger(__name__)



class Verdict(enum.Enum):
    """What the guard's review says the run does next."""

    GO_ON = "go_on"
    ROLL_BACK = "roll_back"
    STOP = "stop"


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
    last_bad_step: int = 0

    @property
    def streak_open(self) -> bool:
        """A bad streak is going on: weights may be poisoned, so no checkpoint now."""
        return self.in_row > 0

    def review(self, step: int, tally: "Tally") -> Verdict:
        """Take in what the device counted since the last review."""
        if not tally.skipped:
            self.in_row = tally.in_row  # 0 once an update went through: a streak has ended
            return Verdict.GO_ON
        self.skipped += tally.skipped
        self.since_checkpoint += tally.skipped
        self.in_row, self.last_bad, self.last_bad_step = tally.in_row, tally.losses, tally.last_bad_step
        log.warning("steps %d-%d: %d with a non-finite loss or gradient, update skipped (gradients "
                    "zeroed), the last at step %d %s; %d in a row now", tally.since + 1, step,
                    tally.skipped, tally.last_bad_step, tally.losses, tally.in_row)
        if tally.worst_in_row < self.cfg.max_bad_steps:
            return Verdict.GO_ON
        self.in_row = max(self.in_row, tally.worst_in_row)
        if self.cfg.on_divergence == "rollback" and self.rollbacks < self.cfg.max_rollbacks:
            return Verdict.ROLL_BACK
        return Verdict.STOP

    def message(self, step: int) -> str:
        return (f"training diverged: {self.in_row} steps in a row with a non-finite loss or gradient, "
                f"the last at step {self.last_bad_step or step} ({self.last_bad})")

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

    @property
    def healthy_since_checkpoint(self) -> bool:
        """No update was skipped since the last checkpoint: one written now may be a rollback target."""
        return self.since_checkpoint == 0

    def mark_checkpointed(self) -> None:
        self.since_checkpoint = 0

    def state_dict(self) -> dict[str, int]:
        """The run's counters (``train.max_rollbacks`` is a budget per run, not per process)."""
        return {"skipped": self.skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        # max(): a rollback restores an older checkpoint, whose counters must not undo the rollback
        self.skipped = max(self.skipped, int(state["skipped"]))
        self.rollbacks = max(self.rollbacks, int(state["rollbacks"]))

    def log_values(self, window: dict[str, float], images: int) -> dict[str, float]:
        return {"skipped_steps": self.skipped, "rollbacks": self.rollbacks}


@dataclass
class Tally:
    """What ``StepTally`` counted between two reviews, as the host reads it."""

    since: int  # the step of the previous review
    skipped: int
    in_row: int
    worst_in_row: int
    last_bad_step: int
    losses: dict[str, float]


class StepTally:
    """Skipped updates counted on the device, step by step, read (and agreed over ranks) on demand.

    Apart from ``step.StatsWindow`` on purpose: the window's sums are reset at every log line and
    exclude skipped steps, while the tally counts exactly those and carries a streak across reads.

    Everything stays a device tensor between reads, so counting a step costs a few tiny kernels and
    no host sync; the read takes one small all-gather and one transfer.
    """

    def __init__(self, device: torch.device, loss_names: tuple[str, ...] = ("loss_D", "loss_G")):
        self.device, self.loss_names = device, loss_names
        self.since = 0
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.in_row, self.worst, self.skipped, self.last_bad_step = (zero.clone() for _ in range(4))
        self.losses = torch.zeros(len(loss_names), dtype=torch.float64, device=device)

    def record(self, step: int, applied: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        bad = (~applied).to(torch.float64)
        self.in_row = (self.in_row + 1) * bad
        self.worst = torch.maximum(self.worst, self.in_row)
        self.skipped = self.skipped + bad
        self.last_bad_step = torch.where(bad > 0, float(step), self.last_bad_step)
        current = torch.stack([stats[n].detach().to(torch.float64) for n in self.loss_names])
        self.losses = torch.where(bad > 0, current, self.losses)

    def read(self, step: int, agree) -> Tally:
        """The tally since the last read, the maximum over ranks (``agree`` gathers a 1-d tensor from
        every rank into (ranks, n)); the window then starts afresh, the current streak carried on."""
        packed = torch.cat([torch.stack([self.skipped, self.in_row, self.worst, self.last_bad_step]),
                            self.losses])
        gathered = agree(packed).view(-1, packed.numel())
        worst_rank = int(gathered[:, 3].argmax())  # the rank that saw the latest bad step names it
        values = gathered[worst_rank].tolist()
        maxima = gathered.amax(0).tolist()
        tally = Tally(self.since, int(maxima[0]), int(maxima[1]), int(maxima[2]), int(values[3]),
                      dict(zip(self.loss_names, values[4:])))
        self.since = step
        self.skipped, self.worst = torch.zeros_like(self.skipped), self.in_row.clone()
        return tally

    def reset(self, step: int) -> None:
        """After a rollback: nothing in a row, a fresh window from ``step``."""
        self.since = step
        self.in_row, self.worst, self.skipped = (torch.zeros_like(self.in_row) for _ in range(3))
