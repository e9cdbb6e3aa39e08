"""The adversarial training loop, written once over Hugging Face Accelerate.

It builds the networks, loss and data by name from the config and knows none of them: the same code
runs in one process, under DDP on gloo or NCCL, under ZeRO 1/2, and in mixed precision; what differs
between those is decided in ``backend``. Read ``train`` and then ``run_loop`` top to bottom for the run;
the step itself is ``step.train_step`` (one generator step with its ``n_critic`` discriminator steps),
the networks ``nets``, the state a checkpoint carries ``runstate``, what the ranks agree on ``ranks``,
and when to stop and save ``stop``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from dist_gan.config import Config, save_config, to_dict
from dist_gan.core.seeds import derive
from dist_gan.data import build_batch_stream
from dist_gan.losses import build_loss
from dist_gan.models.sampling import picture_extent, sample_count, sample_grid
from dist_gan.run import backend, runlock
from dist_gan.run.checkpoint import Snapshot, load_checkpoint, save_checkpoint
from dist_gan.run.guard import DivergenceGuard, StepTally, Verdict
from dist_gan.run.nets import (
    LearningRates,
    build_ema,
    build_nets,
    images_per_step,
    real_images_per_step,
    weights_finite,
)
from dist_gan.run.ranks import ReplicasDiffer, agree_on, any_rank
from dist_gan.run.retention import keep_as_best, last_healthy, prune_checkpoints, remove_stale_staging, restore_best
from dist_gan.run.rundir import SetAside, claim_run_dir, lock_run_dir
from dist_gan.run.runstate import DATA, EMA, WORLD_SIZE, DataPosition, RunState
from dist_gan.run.schedules import build_schedules
from dist_gan.run.step import StatsWindow, train_step
from dist_gan.run.stop import SavePolicy, StopPolicy, StopRequest, is_preemption
from dist_gan.run.tracking import RunLogger

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss or gradient stayed NaN or infinite; the message names the step and the value."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    stopped_by: str  # "max_steps", "time_limit" or the signal's name (SIGUSR1, SIGTERM)
    main_process: bool = True  # rank 0: the one that writes the run's pictures

    @property
    def preempted(self) -> bool:
        return is_preemption(self.stopped_by)


def train(config: Config, stop_request: StopRequest | None = None) -> RunResult:
    """Train a GAN as ``config`` says; return where and why it stopped.

    ``stop_request``: a StopRequest the caller entered earlier (to catch signals during start-up);
    otherwise one is installed for the run. The run directory is locked for the run's duration.
    """
    with contextlib.ExitStack() as cleanup:
        stop_request = stop_request or cleanup.enter_context(StopRequest())
        backend.set_backend_flags(config.speed)
        acc_G, acc_D = backend.make_accelerators(config)
        lock = lock_run_dir(acc_G, Path(config.run.dir))
        if lock is not None:
            cleanup.callback(runlock.release, lock)
        resume_from, earlier_run = claim_run_dir(config, acc_G)
        if earlier_run is not None:
            cleanup.callback(earlier_run.restore)  # a no-op once discarded at the first checkpoint
        return run_loop(config, acc_G, acc_D, stop_request, cleanup, resume_from, earlier_run)


def run_loop(config: Config, acc_G: Accelerator, acc_D: Accelerator, stop_request: StopRequest,
             cleanup: contextlib.ExitStack, resume_from: Path | None,
             earlier_run: SetAside | None = None) -> RunResult:
    """Build -> resume -> loop -> finish; ``cleanup`` closes the data stream and the logger;
    ``earlier_run`` (run.overwrite) is deleted once this run has written a checkpoint."""
    run = Run(config, acc_G, acc_D, cleanup)
    step = run.start(resume_from)
    stop = StopPolicy(config.train.max_steps, config.train.time_limit_min, stop_request, run.any_rank,
                      agree_every_step=run.world == 1)
    bar = tqdm(total=config.train.max_steps, initial=step, disable=not acc_G.is_main_process,
               unit="step", dynamic_ncols=True)
    policy = SavePolicy(config.run.ckpt_every)
    while step < stop.last_step:
        measure = (step + 1) % config.run.log_every == 0 or step + 1 == stop.last_step
        run.schedules.apply(step)
        stats, applied = train_step(run.nets, run.loss, run.data, config, measure)
        step += 1
        run.after_step(step, stats, applied)
        # Between these points the loop never waits for the device nor talks to other ranks
        # (DDP's gradient all-reduce aside): the guard and the stop signal are agreed on here. A
        # signal can end the run at any step in one process (stop.latch_signal: a flag, no
        # collective), at log steps only with several.
        if (measure or policy.wanted(step, step == stop.last_step, run.best.may_find(step))
                or stop.latch_signal()):
            run.agree()
            step, rolled_back = run.review(step)
            if rolled_back:
                bar.n = step
                policy.rolled_back()
                continue
        bar.update(1)
        if measure and run.window.steps:
            values = run.log_window(step)
            bar.set_postfix(loss_D=f"{values['loss_D']:.3f}", loss_G=f"{values['loss_G']:.3f}",
                            img_s=f"{values['imgs_per_sec']:.0f}")
        stop.after_step(step, measure)
        last = step == stop.last_step
        if not stop.preempted:
            run.sample_and_evaluate(step, last)
        if policy.decide(step, last, run.best.found(step), run.guard.streak_open):
            run.checkpoint(step)
            if earlier_run is not None:
                earlier_run.discard()
    bar.close()
    if run.guard.streak_open:  # the final save was deferred: the run would end with nothing saved
        message = (f"the run ended inside a bad streak: its last {run.guard.in_row} step(s) had a "
                   f"non-finite loss or gradient and were skipped, so no checkpoint was written at step "
                   f"{step}; last good checkpoint: {last_healthy(run.run_dir)}")
        run.logger.event(step, {"event": "diverged", "message": message})
        raise TrainingDiverged(message)
    run.logger.event(step, {"event": "preempted" if stop.preempted else "end", "stopped_by": stop.reason,
                            "world_size": run.world, "skipped_steps": run.guard.skipped,
                            "rollbacks": run.guard.rollbacks})
    backend.shut_down(acc_G, [net.wrapped for net in (run.nets.G, run.nets.D, run.nets.E) if net])
    return RunResult(run.run_dir, step, stop.reason, acc_G.is_main_process)


class BestFID:
    """``run.keep_best``: the lowest FID kept so far (``{"fid", "step"}``, the run-state part) and a
    better one measured at the current step, waiting for its checkpoint."""

    def __init__(self, evaluate_every: int) -> None:
        self.evaluate_every = evaluate_every  # 0: keep_best is off
        self.best: dict | None = None
        self.candidate: dict | None = None

    def state_dict(self) -> dict | None:
        return self.best

    def load_state_dict(self, state: dict) -> None:
        self.best = {"fid": float(state["fid"]), "step": int(state["step"])}

    def may_find(self, step: int) -> bool:
        """Whether ``step`` evaluates, so it may find a new best (and save)."""
        return self.evaluate_every > 0 and step % self.evaluate_every == 0

    def consider(self, step: int, fid: float | None) -> None:
        self.candidate = None
        if self.evaluate_every == 0 or fid is None or not math.isfinite(fid):
            return
        if self.best is None or fid < self.best["fid"]:
            self.candidate = {"fid": float(fid), "step": step}

    def found(self, step: int) -> bool:
        """Whether ``step``'s evaluation found a new best (its checkpoint is due)."""
        return self.candidate is not None and self.candidate["step"] == step

    def accept(self) -> dict:
        """The new best becomes the best kept (its checkpoint is being written)."""
        assert self.candidate is not None
        self.best, self.candidate = self.candidate, None
        return self.best


class Run:
    """One run as the loop drives it: the networks, EMA, loss, data, logger and guard, the run state
    they register, and what happens around each step (resume, log, sample, evaluate, checkpoint,
    roll back). The step itself is ``step.train_step``."""

    def __init__(self, config: Config, acc_G: Accelerator, acc_D: Accelerator,
                 cleanup: contextlib.ExitStack) -> None:
        self.config, self.accelerators = config, {"G": acc_G, "D": acc_D}
        self.accelerator = acc = acc_G  # collectives, device and "am I rank 0" for the whole run
        self.rank, self.world, self.run_dir = acc.process_index, acc.num_processes, Path(config.run.dir)
        self.nets = build_nets(config, acc_G, acc_D)
        self.ema = build_ema(config, self.nets.G.plain, self.world)
        self.loss = build_loss(config.loss, acc.autocast, config.speed.share_penalty_forward)
        with acc.main_process_first():  # rank 0 downloads or prepares, if needed
            self.data = build_batch_stream(config.data, config.run.seed, self.rank, self.world,
                                           acc.device, may_prepare=acc.is_main_process,
                                           num_classes=config.model.num_classes, run_dir=self.run_dir)
        cleanup.callback(self.data.close)
        self.evaluator = None
        if config.eval.every:
            from dist_gan.metrics import Evaluator

            with acc.main_process_first():  # rank 0 trains/caches the reference network once
                self.evaluator = Evaluator(config, acc.device)
        self.fixed_z = torch.randn(sample_count(config.data), config.model.z_dim,
                                   generator=torch.Generator().manual_seed(config.run.seed)).to(acc.device)
        self.guard = DivergenceGuard(config.train)
        self.window = StatsWindow()
        self.tally = StepTally(acc.device)
        self.logger = RunLogger(self.run_dir, acc.is_main_process, config.run.trackers, to_dict(config))
        cleanup.callback(self.logger.close)
        self.imgs_per_step = real_images_per_step(config, self.world)
        sides = {"G": [n.optimizer for n in self.nets.generator_side()], "D": [self.nets.D.optimizer]}
        self.schedules = build_schedules(config.schedule, self.imgs_per_step, self.loss, sides,
                                         self.nets.augment)
        self.learning_rates = LearningRates(self.nets, config)
        self.best = BestFID(config.eval.every if config.run.keep_best else 0)
        self.state = RunState()
        # in loading order: the schedulers' step before the scale applied to their rates
        parts = {**self.nets.schedulers(), "lr_scale": self.learning_rates, "loss": self.loss,
                 "augment": self.nets.augment, EMA: self.ema, "best": self.best, "guard": self.guard,
                 "schedules": self.schedules, "nets": self.nets}
        for name, part in parts.items():
            if part is not None:  # a feature the config leaves off has no part
                self.state.register(name, part, optional=name == "guard")  # format 1 had no guard
        self.state.register(DATA, DataPosition(self.data), per_rank=True)

    def any_rank(self, flag: bool) -> bool:
        return any_rank(self.accelerator, flag)

    def agree(self) -> None:
        """At a log or checkpoint step: per-rank state (path length's running mean) becomes the mean
        over ranks, so every rank saves and continues with the same."""
        self.state.agree(lambda t: self.accelerator.reduce(t.to(self.accelerator.device).clone(), "mean"))

    @property
    def sampler(self) -> nn.Module:
        """What samples and evaluations come from: the EMA generator, else G itself."""
        return self.ema.model if self.ema is not None else self.nets.G.plain

    def start(self, resume_from: Path | None) -> int:
        """Clean up, resume from ``resume_from`` if given, record the start; return the step to
        continue from."""
        config, acc = self.config, self.accelerator
        if acc.is_main_process:
            remove_stale_staging(self.run_dir)
            restore_best(self.run_dir)
        verified = config.train.resume == "auto"  # resolve_resume checked its checksums
        step = self.restore(resume_from, verified) if resume_from is not None else 0
        self.tally.reset(step)
        if resume_from is None:
            set_seed(derive(config.run.seed, "noise", self.rank))  # different noise on each rank
        if acc.is_main_process:
            save_config(config, self.run_dir / "config.yaml")
        self.logger.event(step, {"event": "start", "world_size": self.world,
                                 "resumed_from": str(resume_from or ""), "device": str(acc.device),
                                 "distributed_type": str(acc.distributed_type),
                                 "mixed_precision": acc.mixed_precision,
                                 "effective_batch": images_per_step(config, self.world)})
        log.info("training %s -> step %d on %d process(es), %s, %s, effective batch %d (%d x %d "
                 "processes x %d accumulated), run dir %s", config.loss.name, config.train.max_steps,
                 self.world, acc.device, acc.distributed_type, images_per_step(config, self.world),
                 config.data.batch_size, self.world, config.optim.accumulate, self.run_dir)
        if acc.is_main_process:
            for warning in config.warnings():
                log.warning("%s", warning)
        return step

    def restore(self, path: Path, verified: bool = False) -> int:
        """Load checkpoint ``path`` into everything the run holds; return its step (``verified``:
        its checksums were checked moments ago)."""
        state = load_checkpoint(self.accelerators, path, self.config, verified)  # RNG states too
        step = self.state.load_state_dict(state, self.rank, self.world)
        if int(state[WORLD_SIZE]) != self.world:
            log.warning("checkpoint %s was written by %d process(es), this run has %d: weights, "
                        "optimizers, EMA and step restored; data order and noise re-derived",
                        path, state[WORLD_SIZE], self.world)
            set_seed(derive(self.config.run.seed, "noise/resume", self.rank, step))
        log.info("resumed from %s at step %d", path, step)
        return step

    def after_step(self, step: int, stats: dict[str, torch.Tensor], applied: torch.Tensor) -> None:
        """Count the step on the device (statistics, the guard's tally, the EMA): no host sync."""
        self.window.add(stats, applied)
        self.tally.record(step, applied, stats)
        self.state.after_step(step)

    def review(self, step: int) -> tuple[int, bool]:
        """At a log or checkpoint step: the guard reads the device tally (agreed over ranks) and the
        run goes on, rolls back or stops; return the step to go on from and whether it rolled back."""
        verdict = self.guard.review(step, self.tally.read(step, self.accelerator.gather))
        if verdict is Verdict.GO_ON:
            return step, False
        target = last_healthy(self.run_dir)
        message = self.guard.message(step)
        if verdict is Verdict.STOP or target is None:
            self.logger.event(step, {"event": "diverged", "message": message})
            raise TrainingDiverged(f"{message}{self.guard.why_stopped(target)}; last good checkpoint: "
                                   f"{target}")
        self.guard.rolled_back()
        step = self.restore(target, verified=True)  # last_healthy checked it
        self.tally.reset(step)
        self.learning_rates.scale_down(self.config.train.rollback_lr_scale)
        # a different noise stream, or the same steps would diverge the same way
        set_seed(derive(self.config.run.seed, "noise/rollback", self.rank, self.guard.rollbacks))
        self.logger.event(step, {"event": "rollback", "message": message, "to": str(target),
                                 "lr_scale": self.learning_rates.scale, "rollbacks": self.guard.rollbacks})
        log.warning("%s; rolled back to %s with learning rates x%s", message, target,
                    self.config.train.rollback_lr_scale)
        self.window.reset()
        return step, True

    def log_window(self, step: int) -> dict[str, float]:
        """Average the window over steps and ranks, log it, and stop on a non-finite value."""
        values = self.window.means(self.accelerator)
        counters = self.data.counters()  # e.g. skipped bad samples: summed over ranks
        if counters:
            totals = torch.tensor(list(counters.values()), device=self.accelerator.device)
            values.update(zip(counters, self.accelerator.reduce(totals, "sum").tolist()))
        values.update(
            imgs_per_sec=self.imgs_per_step * self.window.steps / (time.perf_counter() - self.window.start),
            kimg=step * self.imgs_per_step / 1000, world_size=self.world)
        values.update(self.state.log_values(values, self.imgs_per_step * self.window.steps))
        if self.accelerator.device.type == "cuda":  # the allocator's own count: no device sync
            values["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 1e9
        self.logger.scalars(step, values)
        self.window.reset()
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        # With the guard on, a window of skipped steps has no value to average (NaN, logged as
        # null): the guard's review decides; without it a non-finite value stops the run here.
        if bad and not self.config.train.skip_nonfinite:
            raise TrainingDiverged(f"non-finite values at step {step}: {bad}; last good "
                                   f"checkpoint: {last_healthy(self.run_dir)}")
        return values

    def sample_and_evaluate(self, step: int, last: bool) -> None:
        config = self.config
        if step % config.run.sample_every == 0 or last:
            self.logger.images(step, "ema" if self.ema is not None else "G",
                               sample_grid(self.sampler, self.fixed_z, config.model.num_classes,
                                           config.run.sample_truncation), picture_extent(config.data))
        if self.evaluator and (step % config.eval.every == 0 or last):
            figures = self.evaluator(self.sampler, self.accelerator)
            self.logger.scalars(step, figures or {}, tb_prefix="eval/")
            fid = [figures["fid"] if figures else None]  # rank 0's figure: the save is collective
            self.best.consider(step, broadcast_object_list(fid)[0] if self.world > 1 else fid[0])

    def checkpoint(self, step: int) -> None:
        """Save at ``step`` (the SavePolicy decided it: no bad streak is open), then prune."""
        healthy = self.guard.healthy_since_checkpoint and weights_finite(self.state.weights())
        replicas = agree_on(self.accelerator, self.state.replica_values())
        if not all(replicas.values()):
            error = ReplicasDiffer.naming(replicas, self.state.replica_values(), step)
            self.logger.event(step, {"event": "replicas_differ", "message": str(error),
                                     "replicas_identical": replicas})
            raise error
        new_best = self.best.accept() if self.best.found(step) else None
        nets = self.nets
        weights = {"generator": nets.G.plain, **({"encoder": nets.E.plain} if nets.E is not None else {})}
        state = self.state.state_dict(step, self.world, gather_object)
        path = save_checkpoint(Snapshot(step, self.accelerators, state, weights, self.config, healthy),
                               self.run_dir)
        self.guard.mark_checkpointed()
        if self.accelerator.is_main_process:
            prune_checkpoints(self.run_dir, self.config.run.keep_last)
        self.accelerator.wait_for_everyone()
        self.logger.event(step, {"event": "checkpoint", "path": str(path), "world_size": self.world,
                                 "healthy": healthy, "replicas_identical": replicas})
        if new_best is not None:
            if self.accelerator.is_main_process:
                kept = keep_as_best(path)
                self.logger.event(step, {"event": "best", "fid": new_best["fid"], "path": str(kept),
                                         "from": str(path)})
            self.accelerator.wait_for_everyone()
