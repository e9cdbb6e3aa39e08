"""The divergence guard and the stop policy on their own (the loop's use of them: test_scale.py,
test_faults.py)."""

from __future__ import annotations

import signal

import pytest
import torch

from dist_gan.config import TrainConfig
from dist_gan.run.guard import DivergenceGuard, StepTally, Verdict
from dist_gan.run.stop import StopPolicy, StopRequest, is_preemption

pytestmark = pytest.mark.tier("unit")

GO_ON, ROLL_BACK, STOP = Verdict.GO_ON, Verdict.ROLL_BACK, Verdict.STOP

GOOD = {"loss_D": torch.tensor(0.5), "loss_G": torch.tensor(0.7)}
BAD = {"loss_D": torch.tensor(float("inf")), "loss_G": torch.tensor(0.7)}


def stepper(guard: DivergenceGuard):
    """``step(number, applied)``: one step counted on the device and reviewed at once (as if every
    step were a log step), with a tally of its own; ``step.tally`` to reset after a rollback."""
    tally = StepTally(torch.device("cpu"))

    def step(number: int, applied: bool) -> str:
        tally.record(number, torch.tensor(applied), GOOD if applied else BAD)
        return guard.review(number, tally.read(number, lambda t: t[None]))

    step.tally = tally
    return step


def test_stop_after_max_bad_steps_in_a_row_and_a_good_step_resets_the_count():
    guard = DivergenceGuard(TrainConfig(max_bad_steps=3))
    step = stepper(guard)
    assert [step(s, False) for s in (1, 2)] == [GO_ON, GO_ON]
    assert step(3, True) == GO_ON and not guard.streak_open
    assert [step(s, False) for s in (4, 5, 6)] == [GO_ON, GO_ON, STOP]
    assert guard.skipped == 5 and guard.streak_open
    assert "3 steps in a row" in guard.message(6) and "at step 6" in guard.message(6)
    assert guard.why_stopped(None) == ""


def test_roll_back_until_the_budget_is_spent():
    guard = DivergenceGuard(TrainConfig(max_bad_steps=1, on_divergence="rollback", max_rollbacks=2))
    step = stepper(guard)
    for _ in range(2):
        assert step(1, False) == ROLL_BACK
        guard.rolled_back()
        step.tally.reset(0)
        assert not guard.streak_open
    assert step(1, False) == STOP
    assert guard.why_stopped("ckpt") == "; 2 rollbacks (train.max_rollbacks) spent"
    assert guard.why_stopped(None) == "; no checkpoint to roll back to"


def test_a_checkpoint_after_skipped_updates_is_not_healthy_and_the_next_clean_one_is():
    guard = DivergenceGuard(TrainConfig())
    assert guard.healthy_since_checkpoint is True
    step = stepper(guard)
    step(1, False)
    step(2, True)
    assert guard.healthy_since_checkpoint is False and guard.healthy_since_checkpoint is False  # a question
    guard.mark_checkpointed()
    step(3, True)
    assert guard.healthy_since_checkpoint is True


def test_the_guards_counters_are_state_and_a_rollback_never_lowers_them():
    guard = DivergenceGuard(TrainConfig(max_bad_steps=1, on_divergence="rollback", max_rollbacks=3))
    step = stepper(guard)
    assert step(1, False) == ROLL_BACK
    guard.rolled_back()
    saved = guard.state_dict()
    assert saved == {"skipped": 1, "rollbacks": 1}
    fresh = DivergenceGuard(guard.cfg)  # a new process resuming the run
    fresh.load_state_dict(saved)
    assert (fresh.skipped, fresh.rollbacks) == (1, 1)
    guard.rolled_back()
    guard.load_state_dict({"skipped": 0, "rollbacks": 0})  # the rollback target is older
    assert (guard.skipped, guard.rollbacks) == (1, 2)


def test_stop_policy_time_limit_on_log_steps_and_signals_at_once():
    request = StopRequest()
    policy = StopPolicy(100, time_limit_min=1e-9, request=request, any_rank=lambda flag: flag)
    policy.after_step(3, log_step=False)  # the time is only checked on log steps
    assert (policy.last_step, policy.reason) == (100, "max_steps")
    policy.after_step(4, log_step=True)
    assert (policy.last_step, policy.reason, policy.preempted) == (4, "time_limit", False)
    with request:
        signal.raise_signal(signal.SIGUSR1)
        policy.after_step(5, log_step=False)
    assert (policy.last_step, policy.reason, policy.preempted) == (5, "SIGUSR1", True)


def test_a_rank_that_learns_of_another_ranks_signal_stops_too():
    policy = StopPolicy(100, 0, StopRequest(), any_rank=lambda flag: True)
    policy.after_step(7, log_step=True)
    assert (policy.last_step, policy.reason) == (7, "SIGNAL") and is_preemption(policy.reason)
    assert not is_preemption("time_limit") and not is_preemption("SIGHUP")


def test_the_device_tally_reports_streaks_and_the_last_bad_step_at_review():
    tally, guard = StepTally(torch.device("cpu")), DivergenceGuard(TrainConfig(max_bad_steps=3))
    agree = lambda t: t[None]  # noqa: E731 (one rank)
    loss = {"loss_D": torch.tensor(1.0), "loss_G": torch.tensor(2.0)}
    nan = {"loss_D": torch.tensor(float("nan")), "loss_G": torch.tensor(3.0)}
    for step, ok in zip(range(1, 6), (True, False, False, True, False)):
        tally.record(step, torch.tensor(ok), loss if ok else nan)
    read = tally.read(5, agree)
    assert (read.skipped, read.in_row, read.worst_in_row, read.last_bad_step) == (3, 1, 2, 5)
    assert read.losses["loss_G"] == 3.0 and read.losses["loss_D"] != read.losses["loss_D"]  # NaN
    assert guard.review(5, read) == GO_ON and guard.skipped == 3 and guard.streak_open
    for step in (6, 7):  # the streak goes on across the review: 3 in a row
        tally.record(step, torch.tensor(False), nan)
    assert guard.review(7, tally.read(7, agree)) == STOP
    assert "3 steps in a row" in guard.message(7) and "the last at step 7" in guard.message(7)
    assert guard.review(8, tally.read(8, agree)) == GO_ON and guard.streak_open  # nothing new
    tally.record(9, torch.tensor(True), loss)
    assert guard.review(9, tally.read(9, agree)) == GO_ON and not guard.streak_open  # it ended
