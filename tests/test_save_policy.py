"""The loop's run state (issue 25): one save policy, and one owner of the checkpoint's keys."""

from __future__ import annotations

import contextlib

import torch

from dist_gan.checkpoint import SavePolicy
from dist_gan.loop import Trainer


def test_periodic_saves_and_the_last_step():
    policy = SavePolicy(every=3)
    saves = [step for step in range(1, 9) if policy.save_now(step, last=step == 8, best_due=False, streak_open=False)]
    assert saves == [3, 6, 8]
    assert [s for s in range(1, 9) if policy.may_save(s, last=s == 8)] == [3, 6, 8]


def test_a_stop_signal_makes_this_step_the_last_and_saves_it():
    policy = SavePolicy(every=100)
    assert not policy.save_now(7, last=False, best_due=False, streak_open=False)
    assert policy.may_save(7, last=True) and policy.save_now(7, last=True, best_due=False, streak_open=False)


def test_a_save_during_a_bad_streak_is_deferred_until_it_ends():
    policy = SavePolicy(every=2)
    assert not policy.save_now(2, last=False, best_due=False, streak_open=True)  # due, deferred
    assert policy.owed and policy.may_save(3, last=False)
    assert not policy.save_now(3, last=False, best_due=False, streak_open=True)  # still open
    assert policy.save_now(4, last=False, best_due=False, streak_open=False)  # the first clean step
    assert not policy.owed
    assert not policy.save_now(5, last=False, best_due=False, streak_open=False)
    # a rollback forgets what was owed: the restored checkpoint is the save
    policy.save_now(6, last=False, best_due=False, streak_open=True)
    policy.rolled_back()
    assert not policy.owed


def test_keep_best_saves_at_an_evaluation_step_with_a_new_best():
    policy = SavePolicy(every=100, evaluate_every=5)
    assert policy.may_save(5, last=False) and not policy.may_save(6, last=False)
    assert not policy.save_now(5, last=False, best_due=False, streak_open=False)  # no better FID
    assert policy.save_now(10, last=False, best_due=True, streak_open=False)


def _trainer(tmp_path, name: str) -> tuple[Trainer, contextlib.ExitStack]:
    from dist_gan import backend
    from dist_gan.config import load_config

    config = load_config("configs/mnist_r3gan.yaml", {
        "run.dir": str(tmp_path / name), "data.source": "synthetic", "data.format": "memory",
        "data.batch_size": 4, "model.generator.widths": "[16,16,16]", "model.discriminator.widths": "[16,16,16]",
        "augment.kind": "diffaugment", "run.trackers": "[]", "loss.historical_averaging": 0.01})
    stack = contextlib.ExitStack()
    acc_G, acc_D = backend.make_accelerators(config)
    return Trainer(config, acc_G, acc_D, stack), stack


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key in tree for k, v in _flat(tree[key], f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, item in enumerate(tree) for k, v in _flat(item, f"{prefix}{i}.").items()}
    return {prefix: tree}


def test_the_trainers_state_dict_round_trips_every_key(tmp_path):
    """state_dict names every key a checkpoint carries; load_state_dict restores each of them."""
    from dist_gan.nets import set_learning_rates
    from dist_gan.step import train_step

    first, stack_a = _trainer(tmp_path, "a")
    with stack_a:
        for step in range(3):
            first.schedules.apply(step)
            stats, applied = train_step(first.nets, first.loss, first.data, first.config, measure=False)
            first.after_step(step + 1, stats, applied)
        first.lr_scale = 0.25  # as after a rollback
        set_learning_rates(first.nets, first.config, first.lr_scale)
        state = first.state_dict(3, {"fid": 1.5, "step": 2})
        assert set(state) == {"step", "lr_scale", "loss", "best", "augment", "ema", "sched_G", "sched_D"}
        second, stack_b = _trainer(tmp_path, "b")
        with stack_b:
            second.load_state_dict({**state, "ranks": [first.data.state_dict()], "world_size": 1})
            again = second.state_dict(3, second.best)
            a, b = _flat(state), _flat(again)
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert torch.equal(a[key], b[key]), key
                else:
                    assert a[key] == b[key], key
            assert second.data.state_dict() == first.data.state_dict()
