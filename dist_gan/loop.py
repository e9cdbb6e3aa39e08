"""The adversarial training loop, written once over Hugging Face Accelerate.

It builds the networks, loss and data by name from the config and knows none of them: the same code
runs in one process, under DDP on gloo or NCCL, under ZeRO 1/2, and in mixed precision; what differs
between those is decided in ``backend``. Read ``train`` top to bottom for the run; ``train_step`` is
one generator step with its ``n_critic`` discriminator steps.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from dist_gan import backend, runlock
from dist_gan.augment import Augmentation, AugmentedDiscriminator, build_augmentation
from dist_gan.checkpoint import (ReplicasDiffer, checkpoint_root, checkpoint_step, keep_as_best,
                                 last_healthy, list_checkpoints, load_checkpoint, remove_stale_staging,
                                 restore_best, resolve_resume, save_checkpoint)
from dist_gan.config import Config, ConfigError, OptimConfig, Ramp, save_config, to_dict
from dist_gan.data import BatchStream, build_batch_stream
from dist_gan.ema import EMA, ema_beta, step_beta
from dist_gan.guard import GO_ON, STOP, DivergenceGuard, StepTally
from dist_gan.losses import GANLoss, Models, build_loss
from dist_gan.models import build_discriminator, build_encoder, build_generator
from dist_gan.sample import decode
from dist_gan.schedules import build_schedules
from dist_gan.seeds import derive
from dist_gan.stop import StopPolicy, StopRequest, is_preemption
from dist_gan.tracking import RunLogger

log = logging.getLogger(__name__)

SAMPLE_GRID_SIZE = 64


class TrainingDiverged(RuntimeError):
    """A loss or gradient stayed NaN or infinite; the message names the step and the value."""


@dataclass
class Net:
    """One network as the loop uses it.

    ``wrapped``: what training forwards and backward go through (DDP-wrapped or an engine,
    maybe compiled). ``plain``: the network itself, for sampling, the EMA, checkpoint weights, and
    reading D in the generator step (its weights frozen there, so no wrapper should see them).
    """

    wrapped: nn.Module
    plain: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Accelerator


@dataclass
class Nets:
    """G, D and (VAE-GAN only) the encoder E, trained with G by G's accelerator in the generator
    step; ``D_for_penalty`` / ``G_for_penalty``: what penalties differentiate twice through
    (backend.penalty_view); ``augment``: what every image D judges goes through first (augment.kind)."""

    G: Net
    D: Net
    D_for_penalty: nn.Module
    num_classes: int = 0
    E: Net | None = None
    G_for_penalty: nn.Module | None = None
    augment: Augmentation | None = None

    def models(self, z_dim: int) -> Models:
        """The view a loss gets: with augmentation, each view of D augments its input first."""
        D_views = [self.D.wrapped, self.D.plain, self.D_for_penalty]
        if self.augment is not None:
            D_views = [AugmentedDiscriminator(view, self.augment) for view in D_views]
        return Models(self.G.wrapped, *D_views, self.E.wrapped if self.E is not None else None, z_dim,
                      self.num_classes, functools.partial(backend.loss_scale, self.D.accelerator, self.D.wrapped),
                      self.G_for_penalty)

    def generator_side(self) -> list[Net]:
        """The networks the generator step updates."""
        return [self.G] if self.E is None else [self.G, self.E]

    def plain(self) -> dict[str, nn.Module]:
        """The plain networks by name (replica checks, finiteness)."""
        return {"G": self.G.plain, "D": self.D.plain, **({"E": self.E.plain} if self.E else {})}

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Named as their entries in the loop state of a checkpoint."""
        found = {"sched_G": self.G.scheduler, "sched_D": self.D.scheduler}
        if self.E is not None:
            found["sched_E"] = self.E.scheduler
        return found


@dataclass
class RunResult:
    run_dir: Path
    step: int
    stopped_by: str  # "max_steps", "time_limit" or the signal's name (SIGUSR1, SIGTERM)

    @property
    def preempted(self) -> bool:
        return is_preemption(self.stopped_by)


def build_adam(params, lr: float, betas: tuple[float, float], impl: str) -> torch.optim.Adam:
    """Adam with the implementation ``speed.adam_impl`` names (auto: torch's default choice)."""
    flags = {"auto": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True},
             "fused": {"fused": True}}[impl]
    return torch.optim.Adam(params, lr=lr, betas=betas, **flags)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int,
                   ramp: Ramp | None = None, base_lr: float = 1.0,
                   kimg_per_step: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate factor per step: 1, a linear decay to 0 at ``max_steps``, or ``ramp`` (a
    schedule over kimg, as a factor of the config's ``base_lr``)."""
    if ramp is not None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: ramp.at(s * kimg_per_step) / base_lr)
    if cfg.lr_schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def build_nets(config: Config, acc_G: Accelerator, acc_D: Accelerator | None = None) -> Nets:
    """Build G and D (and E) by name, with optimisers and schedules, prepared by their accelerators.

    Schedulers are built on the unwrapped optimisers and stepped by the loop once per generator
    step (an engine would otherwise step D's once per critic step); they are saved with the loop state.
    """
    acc_D = acc_D or acc_G
    set_seed(derive(config.run.seed, "weights"))  # the same initial weights on every rank
    G, D, E = build_generator(config), build_discriminator(config), build_encoder(config)
    if backend.use_channels_last(config, acc_G):
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    opt, impl, steps = config.optim, config.speed.adam_impl, config.train.max_steps
    opt_G = build_adam(G.parameters(), opt.g_lr, opt.betas, impl)
    opt_D = build_adam(D.parameters(), opt.d_lr, opt.betas, impl)
    opt_E = build_adam(E.parameters(), opt.g_lr, opt.betas, impl) if E is not None else None
    fixed = config.speed.ddp_fixed_buckets
    if E is not None:  # G first: its weights keep the name model.safetensors
        G_w, E_w, opt_G_w, opt_E_w = backend.prepare(acc_G, "G", G, E, opt_G, opt_E, fixed_buckets=fixed)
    else:
        G_w, opt_G_w = backend.prepare(acc_G, "G", G, opt_G, fixed_buckets=fixed)
    D_w, opt_D_w = backend.prepare(acc_D, "D", D, opt_D, fixed_buckets=fixed)
    G_plain, D_plain = backend.plain(acc_G, G_w), backend.plain(acc_D, D_w)
    D_for_penalty = backend.penalty_view(acc_D, D_w, D_plain)
    G_for_penalty = backend.penalty_view(acc_G, G_w, G_plain)
    if config.speed.compile:  # penalties keep the eager module: compile has no double backward
        G_w, D_w = torch.compile(G_w), torch.compile(D_w)
    kimg_per_step = real_images_per_step(config, acc_G.num_processes) / 1000
    ramp_G, ramp_D = config.schedule.g_lr, config.schedule.d_lr
    nets = Nets(Net(G_w, G_plain, opt_G_w, build_schedule(opt_G, opt, steps, ramp_G, opt.g_lr, kimg_per_step), acc_G),
                Net(D_w, D_plain, opt_D_w, build_schedule(opt_D, opt, steps, ramp_D, opt.d_lr, kimg_per_step), acc_D),
                D_for_penalty, config.model.num_classes, G_for_penalty=G_for_penalty,
                augment=build_augmentation(config.augment))
    if E is not None:
        nets.E = Net(E_w, backend.plain(acc_G, E_w), opt_E_w,
                     build_schedule(opt_E, opt, steps, ramp_G, opt.g_lr, kimg_per_step), acc_G)
    return nets


def _backward(accelerator: Accelerator, loss: torch.Tensor, accumulate: int, guard: bool) -> torch.Tensor:
    """Backward of one micro-batch's loss, scaled for accumulation; returns whether it was finite.

    Where gradients cannot be checked before the step (an engine steps inside ``backward``; an fp16
    scaler), a non-finite loss is replaced by 0 on the device (zero gradients from this rank), so
    no rank waits for a verdict."""
    finite = torch.isfinite(loss.detach())
    if guard and not backend.grads_inspectable(accelerator):
        loss = torch.where(finite, loss, torch.zeros_like(loss))
    backend.backward(accelerator, loss, accumulate)
    return finite


def _zero_if(models: list[nn.Module], keep: torch.Tensor) -> None:
    """Gradients zeroed (NaN/inf included) unless ``keep``: decided on the device, as StyleGAN2-ADA
    does, so the step never waits for the verdict. Adam's momentum still moves the weights a little."""
    for model in models:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.copy_(torch.where(keep, p.grad, torch.zeros_like(p.grad)))


def _step(accelerator: Accelerator, models: list[nn.Module], optimizers: list[torch.optim.Optimizer],
          finite: torch.Tensor, config: Config, measure: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clip, check and step one side of the game (D; or G with any networks trained with it) after
    its micro-batches' backward; returns (applied, as a device bool; the first network's pre-clip
    grad norm).

    With ``train.skip_nonfinite`` a non-finite update is skipped on the device: every rank sees the
    same all-reduced gradient norm, so every rank zeroes alike without a collective or a host sync.
    """
    guard = config.train.skip_nonfinite
    check_grads = guard and backend.grads_inspectable(accelerator)
    norms = [backend.grad_norm(accelerator, model, config.optim.grad_clip, measure or check_grads)
             for model in models]
    applied = finite if guard else torch.ones_like(finite)
    if check_grads:
        applied = torch.stack([torch.isfinite(norm) for norm in norms]).all()
        _zero_if(models, applied)
    for optimizer in optimizers:
        optimizer.step()
    return applied, norms[0]


def train_step(nets: Nets, loss: GANLoss, data: BatchStream, config: Config,
               measure: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``n_critic`` discriminator updates, then one generator update, each over ``optim.accumulate``
    micro-batches.

    Returns detached statistics (means over micro-batches and critic steps) and, as a device bool,
    whether every update was applied (False: the divergence guard skipped at least one). Nothing in
    here waits for the device.
    """
    models = nets.models(config.model.z_dim)
    set_to_none = config.speed.zero_grad_set_to_none
    accumulate, guard = config.optim.accumulate, config.train.skip_nonfinite
    applied = torch.ones((), dtype=torch.bool, device=nets.D.accelerator.device)
    d_totals: dict[str, torch.Tensor] = {}
    for _ in range(config.optim.n_critic):
        nets.D.optimizer.zero_grad(set_to_none=set_to_none)
        batches, finite = [], torch.ones_like(applied)
        for micro in range(accumulate):
            batches.append(data.next_batch())
            with backend.micro_batch(nets.D.accelerator, [nets.D.wrapped], micro == accumulate - 1):
                d_loss, d_stats = loss.discriminator_loss(models, *batches[-1])
                finite &= _backward(nets.D.accelerator, d_loss, accumulate, guard)
            for name, value in d_stats.items():
                d_totals[name] = d_totals.get(name, 0.0) + value
        ok, d_norm = _step(nets.D.accelerator, [nets.D.wrapped], [nets.D.optimizer], finite, config, measure)
        applied &= ok
        loss.after_discriminator_step(nets.D.plain)
    stats = {name: total / (config.optim.n_critic * accumulate) for name, total in d_totals.items()}

    # D is used raw and frozen here: its weights get no gradient, its DDP reducer is not left waiting
    # for gradients that never come, and ZeRO-2 does not see D's gradients computed twice. The
    # generator step reuses the last critic step's batches (VAE-GAN encodes them, feature matching
    # reads them).
    nets.D.plain.requires_grad_(False)
    g_side = nets.generator_side()
    for net in g_side:
        net.optimizer.zero_grad(set_to_none=set_to_none)
    g_totals: dict[str, torch.Tensor] = {}
    finite = torch.ones_like(applied)
    for micro, (real, labels) in enumerate(batches):
        with backend.micro_batch(nets.G.accelerator, [n.wrapped for n in g_side], micro == accumulate - 1):
            g_loss, g_stats = loss.generator_loss(models, real, labels)
            finite &= _backward(nets.G.accelerator, g_loss, accumulate, guard)
        for name, value in g_stats.items():
            g_totals[name] = g_totals.get(name, 0.0) + value
    ok, g_norm = _step(nets.G.accelerator, [n.wrapped for n in g_side], [n.optimizer for n in g_side],
                       finite, config, measure)
    applied &= ok
    loss.after_generator_step(nets.G.plain)
    nets.D.plain.requires_grad_(True)
    for scheduler in nets.schedulers().values():
        scheduler.step()

    stats.update({name: total / accumulate for name, total in g_totals.items()})
    if measure and d_norm is not None and g_norm is not None:
        stats["grad_norm_D"], stats["grad_norm_G"] = d_norm.detach(), g_norm.detach()
    return stats, applied


class StatsWindow:
    """Per-step statistics summed since the last log line; averaged over steps and ranks on demand.

    Statistics stay tensors on the device between log lines, so logging costs one collective and one
    host sync per interval rather than per step. Grad norms appear on log steps only and are averaged
    over the steps that have them.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor], applied: torch.Tensor) -> None:
        """Add a step's statistics where ``applied`` (a device bool): a skipped step's NaNs stay out."""
        for name, value in stats.items():
            value = torch.as_tensor(value, dtype=torch.float32, device=applied.device)
            self.sums[name] = self.sums.get(name, 0.0) + torch.where(applied, value, 0.0)
            self.counts[name] = self.counts.get(name, 0.0) + applied.float()
        self.steps += 1

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over the applied steps and the ranks (NaN for a value no applied step has)."""
        names = sorted(self.sums)
        if not names:
            return {}
        stacked = torch.stack([self.sums[n] / self.counts[n] for n in names])
        return dict(zip(names, accelerator.reduce(stacked, "mean").tolist()))


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any: ranks must agree on when to skip or stop."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum") > 0)


def _checksums(module: nn.Module) -> torch.Tensor:
    """(tensors, 4) float64 fingerprints of a module's parameters: the sum, an index-weighted sum
    (catches moved values), and the NaN and inf counts (a NaN compares equal to a NaN here)."""
    rows = []
    for p in module.parameters():
        flat = p.detach().flatten().double()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64) % 1021 + 1
        clean = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
        rows.append(torch.stack([clean.sum(), (clean * weights).sum(), flat.isnan().sum().double(),
                                 flat.isinf().sum().double()]))
    return torch.stack(rows)


@torch.no_grad()
def check_replicas(accelerator: Accelerator, modules: dict[str, nn.Module]) -> dict[str, bool]:
    """Whether every rank holds identical parameters of each module (the DDP invariant), compared
    through per-tensor checksums: one small all-gather whatever the model size.

    Every rank computes its checksums with the same kernels in the same order, so identical weights
    give bit-identical checksums; a one-ulp difference anywhere changes the float64 sums. Buffers
    are left out on purpose: BatchNorm statistics are updated from each rank's own batch and DDP
    re-broadcasts rank 0's before every forward, so rank 0's are the ones used and saved.
    """
    names = list(modules)
    local = torch.cat([_checksums(modules[n]).flatten() for n in names]).to(accelerator.device)
    sizes = [sum(1 for _ in modules[n].parameters()) * 4 for n in names]
    gathered = accelerator.gather(local[None]).view(accelerator.num_processes, -1)
    same = (gathered == gathered[0]).all(0).tolist()
    result, start = {}, 0
    for name, size in zip(names, sizes):
        result[name] = all(same[start:start + size])
        start += size
    return result


def same_on_every_rank(accelerator: Accelerator, value: float) -> bool:
    """Whether every rank holds exactly ``value`` (one small all-gather)."""
    gathered = accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device))
    return bool((gathered == gathered[0]).all())


def images_per_step(config: Config, world_size: int) -> int:
    """Images the generator makes per step over all ranks (the EMA's unit, the effective batch)."""
    return config.data.batch_size * world_size * config.optim.accumulate


def real_images_per_step(config: Config, world_size: int) -> int:
    """Real images D reads per step over all ranks (throughput and kimg)."""
    return images_per_step(config, world_size) * config.optim.n_critic


def build_ema(config: Config, generator: nn.Module, world_size: int) -> EMA | None:
    """The generator's EMA as ``train`` says: by images (ema_kimg, or its ramp schedule.ema_kimg),
    by steps (ema_decay), or none."""
    train, ramp = config.train, config.schedule.ema_kimg
    if train.ema_decay is not None:
        beta_at = functools.partial(step_beta, decay=train.ema_decay)
        return EMA(generator, beta_at) if train.ema_decay > 0 else None
    ips = images_per_step(config, world_size)
    if ramp is not None:  # the half-life follows the ramp over the real images seen
        kimg_per_step = real_images_per_step(config, world_size) / 1000

        def ramped(step: int) -> float:
            return ema_beta(step, ips, ramp.at(step * kimg_per_step), train.ema_rampup)

        return EMA(generator, ramped)
    if train.ema_kimg <= 0:
        return None
    return EMA(generator, functools.partial(ema_beta, images_per_step=ips, half_life_kimg=train.ema_kimg,
                                            rampup=train.ema_rampup))


def _generate_grid(generator: nn.Module, fixed_z: torch.Tensor, num_classes: int,
                   truncation: float | None = None) -> torch.Tensor:
    """The sample grid: fixed latents; for a conditional model row r (of 8) shows class r."""
    labels = torch.arange(len(fixed_z), device=fixed_z.device) // 8 % num_classes if num_classes else None
    return decode(generator, fixed_z, len(fixed_z), fixed_z.device, labels, truncation)


def _position_for_rank(state: dict, rank: int, world: int) -> dict:
    """This rank's data-stream position from a checkpoint; re-derived when the world size changed.

    Same world size: the rank's own saved position (exact). Otherwise rank 0's epoch and the same
    share of it consumed (batches x old world / new world): the order of the rest of that epoch
    differs from an uninterrupted run, which cannot be helped when ranks split the data differently.
    """
    ranks, saved_world = state["ranks"], int(state["world_size"])
    if saved_world == world:
        return ranks[rank]
    first = ranks[0]
    return {"epoch": int(first["epoch"]), "batch": int(first["batch"]) * saved_world // world}


def _set_learning_rates(nets: Nets, config: Config, scale: float) -> None:
    """Base learning rates from the config (so a resume may change them) times ``scale`` (< 1 after
    rollbacks), with the schedule's factor for the current step applied."""
    config_lr = {"sched_G": config.optim.g_lr, "sched_D": config.optim.d_lr, "sched_E": config.optim.g_lr}
    for name, scheduler in nets.schedulers().items():
        lr = config_lr[name]
        scheduler.base_lrs = [lr * scale] * len(scheduler.base_lrs)
        for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _lock_run_dir(accelerator: Accelerator, run_dir: Path) -> Path | None:
    """Rank 0 takes the run directory's lock; every rank raises RunDirInUse if it could not."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = runlock.acquire(run_dir)
        except runlock.RunDirInUse as err:
            refusal = str(err)
    refusals = [r for r in gather_object([refusal]) if r]
    if refusals:
        raise runlock.RunDirInUse(refusals[0])
    return lock


@torch.no_grad()
def _weights_finite(modules: list[nn.Module]) -> bool:
    return bool(torch.stack([p.isfinite().all() for m in modules for p in m.parameters()]).all())


def train(config: Config, stop_request: StopRequest | None = None) -> RunResult:
    """Train a GAN as ``config`` says; return where and why it stopped.

    ``stop_request``: a StopRequest the caller entered earlier (to catch signals during start-up);
    otherwise one is installed for the run. The run directory is locked for the run's duration.
    """
    with contextlib.ExitStack() as cleanup:
        stop_request = stop_request or cleanup.enter_context(StopRequest())
        backend.set_backend_flags(config.speed)
        acc_G, acc_D = backend.make_accelerators(config)
        lock = _lock_run_dir(acc_G, Path(config.run.dir))
        if lock is not None:
            cleanup.callback(runlock.release, lock)
        resume_from = _claim_run_dir(config, acc_G)
        return _run(config, acc_G, acc_D, stop_request, cleanup, resume_from)


def _claim_run_dir(config: Config, accelerator: Accelerator) -> Path | None:
    """The checkpoint to resume from (None: start fresh), once the run directory may be used:
    a fresh run never writes over another run's checkpoints (unless ``run.overwrite``), and a
    resume that would train no step changes nothing. Raises ConfigError naming the way out."""
    run_dir = Path(config.run.dir)
    resume_from = resolve_resume(config.train.resume, run_dir)
    if resume_from is not None:
        at = checkpoint_step(resume_from)
        if at >= config.train.max_steps:
            raise ConfigError(f"checkpoint {resume_from} is at step {at} and train.max_steps="
                              f"{config.train.max_steps}: there is nothing to train (the run was left "
                              "as it is); raise train.max_steps to continue it")
        return resume_from
    existing = list_checkpoints(run_dir)
    if existing and not config.run.overwrite:
        raise ConfigError(f"run.dir {run_dir} holds another run's checkpoints (newest {existing[-1].name}): "
                          "continue it with --train.resume=auto, or start afresh with --run.overwrite=true "
                          "(deletes them) or another --run.dir")
    if existing:
        if accelerator.is_main_process:
            log.warning("run.overwrite: deleting %d checkpoint(s) and metrics.jsonl of the earlier run in %s",
                        len(existing), run_dir)
            shutil.rmtree(checkpoint_root(run_dir))
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    return None


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
        self.fixed_z = torch.randn(SAMPLE_GRID_SIZE, config.model.z_dim,
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
        return _any_rank(self.accelerator, flag)

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
        return step

    def restore(self, path: Path, verified: bool = False) -> int:
        """Load checkpoint ``path`` into everything the run holds; return its step (``verified``:
        its checksums were checked moments ago)."""
        state = load_checkpoint(self.accelerators, path, self.config, verified)  # RNG states too
        for name, scheduler in self.nets.schedulers().items():
            scheduler.load_state_dict(state[name])
        self.loss.load_state_dict(state["loss"])
        if self.nets.augment is not None and state.get("augment") is not None:
            self.nets.augment.load_state_dict(state["augment"])
        self.lr_scale = float(state["lr_scale"])
        _set_learning_rates(self.nets, self.config, self.lr_scale)
        self.data.load_state_dict(_position_for_rank(state, self.rank, self.world))
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.best = state.get("best")
        if int(state["world_size"]) != self.world:
            log.warning("checkpoint %s was written by %d process(es), this run has %d: weights, "
                        "optimizers, EMA and step restored; data order and noise re-derived",
                        path, state["world_size"], self.world)
            set_seed(derive(self.config.run.seed, "noise/resume", self.rank, int(state["step"])))
        log.info("resumed from %s at step %d", path, int(state["step"]))
        return int(state["step"])

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
        _set_learning_rates(self.nets, self.config, self.lr_scale)
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
                               _generate_grid(self.sampler, self.fixed_z, config.model.num_classes,
                                              config.run.sample_truncation))
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

    def checkpoint(self, step: int, last: bool) -> bool:
        """Save at ``step`` unless a bad streak is open; return whether a save is still owed."""
        if self.guard.streak_open:  # never save weights in the middle of a bad streak
            log.warning("step %d: checkpoint deferred until the divergence guard's bad streak ends%s",
                        step, "; stopping without one" if last else "")
            return True
        averaged = [self.ema.model] if self.ema is not None else []
        healthy = self.guard.checkpointed() and _weights_finite(list(self.nets.plain().values()) + averaged)
        nets = self.nets
        best = self.best_candidate if self.best_due(step) else self.best
        augment = self.nets.augment.state_dict() if self.nets.augment is not None else None
        shared = {"step": step, "lr_scale": self.lr_scale, "loss": self.loss.state_dict(), "best": best,
                  "augment": augment,
                  "ema": self.ema.state_dict() if self.ema is not None else None,
                  **{name: s.state_dict() for name, s in nets.schedulers().items()}}
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
        return False


def _run(config: Config, acc_G: Accelerator, acc_D: Accelerator, stop_request: StopRequest,
         cleanup: contextlib.ExitStack, resume_from: Path | None) -> RunResult:
    """Build -> resume -> loop -> finish; ``cleanup`` closes the data stream and the logger."""
    run = Trainer(config, acc_G, acc_D, cleanup)
    step = run.start(resume_from)
    stop = StopPolicy(config.train.max_steps, config.train.time_limit_min, stop_request, run.any_rank,
                      agree_every_step=run.world == 1)
    bar = tqdm(total=config.train.max_steps, initial=step, disable=not acc_G.is_main_process,
               unit="step", dynamic_ncols=True)
    checkpoint_owed = False  # one fell due during a bad streak
    while step < stop.last_step:
        measure = (step + 1) % config.run.log_every == 0 or step + 1 == stop.last_step
        if run.schedules is not None:
            run.schedules.apply(step)
        stats, applied = train_step(run.nets, run.loss, run.data, config, measure)
        step += 1
        run.after_step(step, stats, applied)
        # Between these points the loop never waits for the device nor talks to other ranks
        # (DDP's gradient all-reduce aside): the guard and the stop signal are agreed on here.
        due = step % config.run.ckpt_every == 0 or step == stop.last_step or checkpoint_owed
        if measure or due:
            run.agree_terms()
            step, rolled_back = run.review(step)
            if rolled_back:
                bar.n, checkpoint_owed = step, False
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
        if step % config.run.ckpt_every == 0 or last or checkpoint_owed or run.best_due(step):
            if not (measure or due):  # a signal moved the last step here: review before saving
                run.agree_terms()
                step, rolled_back = run.review(step)
                if rolled_back:
                    bar.n, checkpoint_owed = step, False
                    continue
            checkpoint_owed = run.checkpoint(step, last)
    bar.close()
    run.logger.event(step, {"event": "preempted" if stop.preempted else "end", "stopped_by": stop.reason,
                            "world_size": run.world, "skipped_steps": run.guard.skipped,
                            "rollbacks": run.guard.rollbacks})
    acc_G.end_training()
    return RunResult(run.run_dir, step, stop.reason)
