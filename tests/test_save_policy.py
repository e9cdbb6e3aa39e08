"""The run's state (issue 33): one save rule, one registry that owns every key a checkpoint's run
state carries, and the divergence guard's counters kept across a restart."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dist_gan.run.loop import Run
from dist_gan.run.stop import SavePolicy

from helpers import TINY_SYNTHETIC

pytestmark = pytest.mark.tier("unit")


def _saves(policy: SavePolicy, steps, last: int, streak=(), best=()) -> list[int]:
    return [s for s in steps if policy.decide(s, last=s == last, best=s in best, streak_open=s in streak)]


def test_periodic_saves_and_the_last_step():
    policy = SavePolicy(every=3)
    assert _saves(policy, range(1, 9), last=8) == [3, 6, 8]
    assert [s for s in range(1, 9) if policy.wanted(s, last=s == 8, best=False)] == [3, 6, 8]


def test_a_stop_signal_makes_this_step_the_last_and_saves_it():
    policy = SavePolicy(every=100)
    assert not policy.decide(7, last=False, best=False, streak_open=False)
    assert policy.wanted(7, last=True, best=False) and policy.decide(7, last=True, best=False, streak_open=False)


def test_a_save_during_a_bad_streak_is_deferred_until_it_ends():
    policy = SavePolicy(every=2)
    assert not policy.decide(2, last=False, best=False, streak_open=True)  # due, deferred
    assert policy.owed and policy.wanted(3, last=False, best=False)
    assert not policy.decide(3, last=False, best=False, streak_open=True)  # still open
    assert policy.decide(4, last=False, best=False, streak_open=False)  # the first clean step
    assert not policy.owed
    assert not policy.decide(5, last=False, best=False, streak_open=False)
    # a rollback forgets what was owed: the restored checkpoint is the save
    policy.decide(6, last=False, best=False, streak_open=True)
    policy.rolled_back()
    assert not policy.owed


def test_keep_best_saves_at_an_evaluation_step_with_a_new_best():
    from dist_gan.run.loop import BestFID

    best, policy = BestFID(evaluate_every=5), SavePolicy(every=100)
    assert best.may_find(5) and not best.may_find(6)
    best.consider(5, float("nan"))  # no usable figure: nothing found
    assert not policy.decide(5, last=False, best=best.found(5), streak_open=False)
    best.consider(10, 3.0)
    assert best.found(10) and policy.decide(10, last=False, best=best.found(10), streak_open=False)
    assert best.accept() == {"fid": 3.0, "step": 10} and best.state_dict() == {"fid": 3.0, "step": 10}
    best.consider(15, 4.0)  # worse than the best kept
    assert not best.found(15)


def _run(tmp_path, name: str) -> tuple[Run, contextlib.ExitStack]:
    from dist_gan.config import load_config
    from dist_gan.run import backend

    tiny = dict(flag[2:].split("=", 1) for flag in TINY_SYNTHETIC)
    config = load_config("configs/mnist_r3gan.yaml", {
        **tiny, "run.dir": str(tmp_path / name), "data.batch_size": 4, "model.generator.widths": "[16,16,16]",
        "model.discriminator.widths": "[16,16,16]", "augment.kind": "diffaugment", "run.trackers": "[]",
        "loss.historical_averaging": 0.01})
    stack = contextlib.ExitStack()
    acc_G, acc_D = backend.make_accelerators(config)
    return Run(config, acc_G, acc_D, stack), stack


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key in tree for k, v in _flat(tree[key], f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, item in enumerate(tree) for k, v in _flat(item, f"{prefix}{i}.").items()}
    return {prefix: tree}


def test_the_run_state_round_trips_every_key(tmp_path):
    """The registry names every key a checkpoint's run state carries; loading restores each."""
    from dist_gan.run.step import train_step

    first, stack_a = _run(tmp_path, "a")
    with stack_a:
        for step in range(3):
            first.schedules.apply(step)
            stats, applied = train_step(first.nets, first.loss, first.data, first.config, measure=False)
            first.after_step(step + 1, stats, applied)
        first.learning_rates.scale_down(0.25)  # as after a rollback
        first.guard.skipped, first.guard.rollbacks = 3, 1
        first.best.best = {"fid": 1.5, "step": 2}  # as kept by keep_best
        state = first.state.state_dict(3, 1, lambda item: item)
        assert set(state) == {"step", "world_size", "ranks", "lr_scale", "loss", "best", "augment", "ema",
                              "sched_G", "sched_D", "guard"}
        second, stack_b = _run(tmp_path, "b")
        with stack_b:
            assert second.state.load_state_dict(state, rank=0, world_size=1) == 3
            again = second.state.state_dict(3, 1, lambda item: item)
            a, b = _flat(state), _flat(again)
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert torch.equal(a[key], b[key]), key
                else:
                    assert a[key] == b[key], key
            assert second.data.state_dict() == first.data.state_dict()
            assert second.nets.G.optimizer.param_groups[0]["lr"] == first.nets.G.optimizer.param_groups[0]["lr"]
            assert (second.guard.skipped, second.guard.rollbacks) == (3, 1)


def test_a_state_saved_before_the_registry_loads(tmp_path):
    """Format 1 (ranks held bare data positions, no guard entry) still resumes."""
    first, stack_a = _run(tmp_path, "a")
    with stack_a:
        state = first.state.state_dict(2, 1, lambda item: item)
        old = {k: v for k, v in state.items() if k != "guard"}
        old["ranks"] = [entry["data"] for entry in state["ranks"]]
        assert first.state.load_state_dict(old, rank=0, world_size=1) == 2
        del old["loss"]
        try:
            first.state.load_state_dict(old, rank=0, world_size=1)
        except ValueError as err:
            assert "no 'loss' entry" in str(err)
        else:
            raise AssertionError("a state without its loss entry loaded")
