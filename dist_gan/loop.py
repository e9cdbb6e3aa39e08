"""The adversarial training loop, written once over Hugging Face Accelerate.

It builds the networks, loss and data by name from the config and knows none of them: the same code
runs in one process, under DDP on gloo or NCCL, under ZeRO 1/2, and in mixed precision; what differs
between those is decided in ``backend``. Read ``train`` and then ``run_loop`` top to bottom for the run;
the step itself is ``step.train_step`` (one generator step with its ``n_critic`` discriminator steps),
the networks ``nets``, what the ranks agree on ``ranks``, and when to save ``checkpoint.SavePolicy``.
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
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from dist_gan import backend, runlock
from dist_gan.checkpoint import (ReplicasDiffer, SavePolicy, keep_as_best, last_healthy, load_checkpoint,
                                 position_for_rank, remove_stale_staging, restore_best, save_checkpoint)
from dist_gan.config import Config, save_config, to_dict
from dist_gan.data import build_batch_stream
from dist_gan.guard import GO_ON, STOP, DivergenceGuard, StepTally
from dist_gan.losses import build_loss
from dist_gan.nets import (build_ema, build_nets, images_per_step, real_images_per_step, set_learning_rates,
                           weights_finite)
from dist_gan.progress import write_run_pictures
from dist_gan.ranks import any_rank, check_replicas, same_on_every_rank
from dist_gan.rundir import SetAside, claim_run_dir, lock_run_dir
from dist_gan.sample import picture_extent, sample_count, sample_grid
from dist_gan.schedules import build_schedules
from dist_gan.seeds import derive
from dist_gan.step import StatsWindow, train_step
from dist_gan.stop import StopPolicy, StopRequest, is_preemption
from dist_gan.tracking import RunLogger

log = logging.getLogger(__name__)



class TrainingDiverged(RuntimeError):
    """A loss or gradient stayed NaN or infinite; the message names the step and the value."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    stopped_by: str  # "max_steps", "time_limit" or the signal's name (SIGUSR1, SIGTERM)

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
    run = Trainer(config, acc_G, acc_D, cleanup)
    step = run.start(resume_from)
    stop = StopPolicy(config.train.max_steps, config.train.time_limit_min, stop_request, run.any_rank,
                      agree_every_step=run.world == 1)
    bar = tqdm(total=config.train.max_steps, initial=step, disable=not acc_G.is_main_process,
               unit="step", dynamic_ncols=True)
    policy = SavePolicy(config.run.ckpt_every, config.eval.every if config.run.keep_best else 0)
    while step < stop.last_step:
        measure = (step + 1) % config.run.log_every == 0 or step + 1 == stop.last_step
        if run.schedules is not None:
            run.schedules.apply(step)
        stats, applied = train_step(run.nets, run.loss, run.data, config, measure)
        step += 1
        run.after_step(step, stats, applied)
        # Between these points the loop never waits for the device nor talks to other ranks
        # (DDP's gradient all-reduce aside): the guard and the stop signal are agreed on here. A
        # signal can end the run at any step in one process (stop.signalled: a flag, no collective),
        # at log steps only with several.
        if measure or policy.may_save(step, step == stop.last_step) or stop.signalled():
            run.agree_terms()
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
        if policy.save_now(step, last, run.best_due(step), run.guard.streak_open):
            run.checkpoint(step, last)
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
    if acc_G.is_main_process and not stop.preempted:  # a pre-empted run has no time to spare
        write_run_pictures(run.run_dir)
    backend.shut_down(acc_G, [net.wrapped for net in (run.nets.G, run.nets.D, run.nets.E) if net])
    return RunResult(run.run_dir, step, stop.reason)


class Trainer:
    """What one run holds besides the step: the networks, EMA, loss, data, logger and guard, and
    what the loop does around each step (resume, log, sample, evaluate, checkpoint, roll back)."""

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
        self.lr_scale = 1.0
        self.guard = DivergenceGuard(config.train)
        self.window = StatsWindow()
        self.tally = StepTally(acc.device)
        self.logger = RunLogger(self.run_dir, acc.is_main_process, config.run.trackers, to_dict(config))
        cleanup.callback(self.logger.close)
        self.imgs_per_step = real_images_per_step(config, self.world)
        sides = {"G": [n.optimizer for n in self.nets.generator_side()], "D": [self.nets.D.optimizer]}
        self.schedules = build_schedules(config.schedule, self.imgs_per_step, self.loss, sides,
                                         self.nets.augment)
        # run.keep_best: the lowest FID kept so far ({"fid", "step"}), and a better one waiting for
        # its checkpoint (saved at the step it was measured)
        self.best: dict | None = None
        self.best_candidate: dict | None = None

    def any_rank(self, flag: bool) -> bool:
        return any_rank(self.accelerator, flag)

    def agree_terms(self) -> None:
        """At a log or checkpoint step: the loss terms' per-rank state (path length's running mean)
        becomes the mean over ranks, so every rank saves and continues with the same."""
        if self.world > 1:
            self.loss.agree(lambda t: self.accelerator.reduce(t.to(self.accelerator.device).clone(), "mean"))

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
        self.load_state_dict(state)
        if int(state["world_size"]) != self.world:
            log.warning("checkpoint %s was written by %d process(es), this run has %d: weights, "
                        "optimizers, EMA and step restored; data order and noise re-derived",
                        path, state["world_size"], self.world)
            set_seed(derive(self.config.run.seed, "noise/resume", self.rank, int(state["step"])))
        log.info("resumed from %s at step %d", path, int(state["step"]))
        return int(state["step"])

    def state_dict(self, step: int, best: dict | None) -> dict:
        """Everything of the run a checkpoint carries besides the accelerators' state (weights,
        optimisers, RNG) and each rank's data position: the one place that names its keys."""
        return {"step": step, "lr_scale": self.lr_scale, "loss": self.loss.state_dict(), "best": best,
                "augment": self.nets.augment.state_dict() if self.nets.augment is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                **{name: s.state_dict() for name, s in self.nets.schedulers().items()}}

    def load_state_dict(self, state: dict) -> None:
        """The inverse of ``state_dict`` (plus this rank's data position from ``state["ranks"]``)."""
        for name, scheduler in self.nets.schedulers().items():
            scheduler.load_state_dict(state[name])
        self.loss.load_state_dict(state["loss"])
        if self.nets.augment is not None and state.get("augment") is not None:
            self.nets.augment.load_state_dict(state["augment"])
        self.lr_scale = float(state["lr_scale"])
        set_learning_rates(self.nets, self.config, self.lr_scale)
        self.data.load_state_dict(position_for_rank(state, self.rank, self.world))
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.best = state.get("best")

    def after_step(self, step: int, stats: dict[str, torch.Tensor], applied: torch.Tensor) -> None:
        """Count the step on the device (statistics, the guard's tally, the EMA): no host sync."""
        self.window.add(stats, applied)
        self.tally.record(step, applied, stats)
        if self.ema is not None:
            self.ema.update(self.nets.G.plain, step)

    def review(self, step: int) -> tuple[int, bool]:
        """At a log or checkpoint step: the guard reads the device tally (agreed over ranks) and the
        run goes on, rolls back or stops; return the step to go on from and whether it rolled back."""
        verdict = self.guard.review(step, self.tally.read(step, self.accelerator.gather))
        if verdict == GO_ON:
            return step, False
        target = last_healthy(self.run_dir)
        message = self.guard.message(step)
        if verdict == STOP or target is None:
            self.logger.event(step, {"event": "diverged", "message": message})
            raise TrainingDiverged(f"{message}{self.guard.why_stopped(target)}; last good checkpoint: "
                                   f"{target}")
        self.guard.rolled_back()
        step = self.restore(target, verified=True)  # last_healthy checked it
        self.tally.reset(step)
        self.lr_scale *= self.config.train.rollback_lr_scale
        set_learning_rates(self.nets, self.config, self.lr_scale)
        # a different noise stream, or the same steps would diverge the same way
        set_seed(derive(self.config.run.seed, "noise/rollback", self.rank, self.guard.rollbacks))
        self.logger.event(step, {"event": "rollback", "message": message, "to": str(target),
                                 "lr_scale": self.lr_scale, "rollbacks": self.guard.rollbacks})
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
            lr_G=self.nets.G.scheduler.get_last_lr()[0], lr_D=self.nets.D.scheduler.get_last_lr()[0],
            kimg=step * self.imgs_per_step / 1000, world_size=self.world,
            skipped_steps=self.guard.skipped, rollbacks=self.guard.rollbacks)
        augment = self.nets.augment
        if augment is not None:  # ADA's p moves on the window's reduced r_t: the same on every rank
            augment.adjust(values.get("D_real_sign", math.nan), self.imgs_per_step * self.window.steps)
            values["augment_p"] = augment.p
        if self.schedules is not None:  # the values the step just taken used
            values.update({f"schedule/{k}": v for k, v in self.schedules.values(step - 1).items()})
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
            if config.run.keep_best:
                self.consider_best(step, figures)

    def consider_best(self, step: int, figures: dict[str, float] | None) -> None:
        """Mark a checkpoint due at ``step`` if its FID (rank 0's figure, shared with every rank:
        the save is collective) beats the best kept so far."""
        fid = [figures["fid"] if figures else None]
        if self.world > 1:
            fid = broadcast_object_list(fid)
        self.best_candidate = None
        if fid[0] is not None and math.isfinite(fid[0]) and (self.best is None or fid[0] < self.best["fid"]):
            self.best_candidate = {"fid": float(fid[0]), "step": step}

    def best_due(self, step: int) -> bool:
        return self.best_candidate is not None and self.best_candidate["step"] == step

    def checkpoint(self, step: int, last: bool) -> None:
        """Save at ``step`` (the SavePolicy decided it may: no bad streak is open)."""
        averaged = [self.ema.model] if self.ema is not None else []
        healthy = self.guard.checkpointed() and weights_finite(list(self.nets.plain().values()) + averaged)
        nets = self.nets
        best = self.best_candidate if self.best_due(step) else self.best
        shared = self.state_dict(step, best)
        weights = {"generator": nets.G.plain, **({"encoder": nets.E.plain} if nets.E is not None else {})}
        replicas: dict[str, bool] = {}

        def replicas_agree() -> dict[str, bool]:
            replicas.update(check_replicas(self.accelerator, nets.plain()))
            if nets.augment is not None:  # ADA's p: agreed by arithmetic on reduced values, checked here
                replicas["augment_p"] = same_on_every_rank(self.accelerator, nets.augment.p)
            if self.schedules is not None:  # ramps: the same function of the step on every rank
                for name, value in self.schedules.values(step).items():
                    replicas[f"schedule/{name}"] = same_on_every_rank(self.accelerator, value)
            return replicas

        try:
            path = save_checkpoint(self.accelerators, self.run_dir, step, shared, self.data.state_dict(),
                                   weights, self.config, healthy, replicas_agree)
        except ReplicasDiffer as err:
            self.logger.event(step, {"event": "replicas_differ", "message": str(err),
                                     "replicas_identical": replicas})
            raise
        self.logger.event(step, {"event": "checkpoint", "path": str(path), "world_size": self.world,
                                 "healthy": healthy, "replicas_identical": replicas})
        if self.best_due(step):
            self.best, self.best_candidate = best, None
            if self.accelerator.is_main_process:
                kept = keep_as_best(path)
                self.logger.event(step, {"event": "best", "fid": best["fid"], "path": str(kept),
                                         "from": str(path)})
            self.accelerator.wait_for_everyone()
