"""The adversarial training loop, written once over Hugging Face Accelerate.

It builds the networks, loss and data by name from the config and knows none of them: the same code
runs in one CPU process, under DDP on gloo or NCCL, and in mixed precision. Read ``train`` top to
bottom for the run; ``train_step`` is one generator step with its ``n_critic`` discriminator steps.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from dist_gan.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from dist_gan.config import Config, OptimConfig, save_config
from dist_gan.data import BatchStream, build_batch_stream
from dist_gan.ema import EMA
from dist_gan.losses import GANLoss, build_loss
from dist_gan.models import build_discriminator, build_generator
from dist_gan.tracking import RunLogger

log = logging.getLogger(__name__)

SAMPLE_GRID_SIZE = 64


class TrainingDiverged(RuntimeError):
    """A loss or gradient norm became NaN or infinite; the message names the step and the value."""


@dataclass
class Nets:
    """The two networks as the loop uses them: wrapped (DDP) for training, raw for everything else."""

    G: nn.Module
    D: nn.Module
    G_raw: nn.Module
    D_raw: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    sched_G: torch.optim.lr_scheduler.LRScheduler
    sched_D: torch.optim.lr_scheduler.LRScheduler


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                   max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.lr_schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def build_nets(config: Config, accelerator: Accelerator) -> Nets:
    set_seed(config.run.seed)  # the same initial weights on every rank
    G, D = build_generator(config), build_discriminator(config)
    opt = config.optim
    opt_G = torch.optim.Adam(G.parameters(), lr=opt.g_lr, betas=opt.betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=opt.d_lr, betas=opt.betas)
    sched_G = build_schedule(opt_G, opt, config.train.max_steps)
    sched_D = build_schedule(opt_D, opt, config.train.max_steps)
    G, D, opt_G, opt_D, sched_G, sched_D = accelerator.prepare(G, D, opt_G, opt_D, sched_G, sched_D)
    # prepare() wraps each forward in autocast; take that off so precision is decided where the loss
    # says (penalties must run in fp32) rather than forced on every call.
    G_raw = accelerator.unwrap_model(G, keep_fp32_wrapper=False)
    D_raw = accelerator.unwrap_model(D, keep_fp32_wrapper=False)
    return Nets(G, D, G_raw, D_raw, opt_G, opt_D, sched_G, sched_D)


def _grad_norm(accelerator: Accelerator, model: nn.Module, max_norm: float,
               measure: bool) -> torch.Tensor | None:
    """Clip to ``max_norm`` when it is set; return the pre-clip norm when clipping or measuring."""
    if max_norm > 0 or measure:
        return accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    return None


def train_step(nets: Nets, loss: GANLoss, data: BatchStream, accelerator: Accelerator,
               config: Config, measure: bool) -> dict[str, torch.Tensor]:
    """``n_critic`` discriminator updates, then one generator update. Returns detached statistics."""
    z_dim, clip = config.model.z_dim, config.optim.grad_clip
    d_totals: dict[str, torch.Tensor] = {}
    for _ in range(config.optim.n_critic):
        real, _labels = data.next_batch()
        z = torch.randn(real.shape[0], z_dim, device=real.device)
        with torch.no_grad(), accelerator.autocast():
            fake = nets.G(z)
        d_loss, d_stats = loss.discriminator_loss(nets.D, real, fake)
        nets.opt_D.zero_grad(set_to_none=True)
        accelerator.backward(d_loss)
        d_norm = _grad_norm(accelerator, nets.D, clip, measure)
        nets.opt_D.step()
        loss.after_discriminator_step(nets.D_raw)
        for name, value in d_stats.items():
            d_totals[name] = d_totals.get(name, 0.0) + value
    stats = {name: total / config.optim.n_critic for name, total in d_totals.items()}

    # D is used raw and frozen here: its weights get no gradient, and under DDP its reducer is not
    # left waiting for gradients that never come.
    nets.D_raw.requires_grad_(False)
    z = torch.randn(config.data.batch_size, z_dim, device=accelerator.device)
    with accelerator.autocast():
        fake = nets.G(z)
    g_loss, g_stats = loss.generator_loss(nets.D_raw, fake)
    nets.opt_G.zero_grad(set_to_none=True)
    accelerator.backward(g_loss)
    g_norm = _grad_norm(accelerator, nets.G, clip, measure)
    nets.opt_G.step()
    nets.D_raw.requires_grad_(True)
    nets.sched_G.step()
    nets.sched_D.step()

    stats.update(g_stats)
    if measure:
        stats["grad_norm_D"], stats["grad_norm_G"] = d_norm.detach(), g_norm.detach()
    return stats


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

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] / self.counts[n] for n in names])
        return dict(zip(names, accelerator.reduce(stacked, "mean").tolist()))


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any: ranks must agree on when to stop."""
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum") > 0)


@torch.no_grad()
def check_replicas(accelerator: Accelerator, modules: dict[str, nn.Module]) -> dict[str, bool]:
    """Whether every rank holds bit-identical parameters of each module (the DDP invariant).

    Buffers are left out on purpose: BatchNorm statistics are updated from each rank's own batch and
    DDP re-broadcasts rank 0's before every forward, so rank 0's are the ones used and saved.
    """
    result = {}
    for name, module in modules.items():
        flat = torch.cat([p.detach().float().flatten() for p in module.parameters()])
        gathered = accelerator.gather(flat.to(accelerator.device)).view(accelerator.num_processes, -1)
        result[name] = bool((gathered == gathered[0]).all())
    return result


def _generate_grid(generator: nn.Module, fixed_z: torch.Tensor) -> torch.Tensor:
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        images = generator(fixed_z)
    generator.train(was_training)
    return images


def make_accelerator(config: Config) -> Accelerator:
    """An Accelerator for this run, refusing a launch that silently lost its other processes."""
    # cpu=True on a GPU-less host: Accelerate otherwise ignores the launcher's WORLD_SIZE there and
    # every process trains alone (accelerate launch --config_file with use_cpu, torchrun).
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision,
                              cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate formed a group "
            f"of {accelerator.num_processes} ({accelerator.distributed_type}); on CPU launch with "
            "--config_file launch/cpu_ddp.yaml (`--cpu --num_processes N` starts one process)")
    return accelerator


def train(config: Config) -> Path:
    """Train a GAN as ``config`` says; return the run directory."""
    accelerator = make_accelerator(config)
    run_dir = Path(config.run.dir)
    nets = build_nets(config, accelerator)
    ema = EMA(nets.G_raw, config.train.ema_decay) if config.train.ema_decay > 0 else None
    loss = build_loss(config.loss, accelerator.autocast)
    with accelerator.main_process_first():  # rank 0 downloads, if a download is needed
        data = build_batch_stream(config.data, config.run.seed, accelerator.process_index,
                                  accelerator.num_processes, accelerator.device,
                                  may_prepare=accelerator.is_main_process)
    evaluator = None
    if config.eval.every:
        from dist_gan.metrics import Evaluator

        with accelerator.main_process_first():  # rank 0 trains/caches the reference network once
            evaluator = Evaluator(config)
    fixed_z = torch.randn(SAMPLE_GRID_SIZE, config.model.z_dim,
                          generator=torch.Generator().manual_seed(config.run.seed)).to(accelerator.device)

    step = 0
    resume_from = resolve_resume(config.train.resume, run_dir)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, config)  # restores RNG states too
        step = int(state["step"])
        data.load_state_dict(state["data"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        log.info("resumed from %s at step %d", resume_from, step)
    else:
        set_seed(config.run.seed, device_specific=True)  # different noise on each rank

    logger = RunLogger(run_dir, enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        save_config(config, run_dir / "config.yaml")
    world = accelerator.num_processes
    logger.event(step, {"event": "start", "world_size": world, "resumed_from": str(resume_from or ""),
                        "device": str(accelerator.device),
                        "distributed_type": str(accelerator.distributed_type),
                        "mixed_precision": config.train.mixed_precision})
    log.info("training %s -> step %d on %d process(es), %s, run dir %s", config.loss.name,
             config.train.max_steps, world, accelerator.device, run_dir)

    imgs_per_step = config.data.batch_size * config.optim.n_critic * world  # real images seen by D
    window = StatsWindow()
    bar = tqdm(total=config.train.max_steps, initial=step, disable=not accelerator.is_main_process,
               unit="step", dynamic_ncols=True)

    def trainer_state() -> dict:
        return {"step": step, "data": data.state_dict(),
                "ema": ema.state_dict() if ema is not None else None}

    last_step = config.train.max_steps
    deadline = time.perf_counter() + config.train.time_limit_min * 60 if config.train.time_limit_min else None
    while step < last_step:
        measure = (step + 1) % config.run.log_every == 0 or step + 1 == last_step
        stats = train_step(nets, loss, data, accelerator, config, measure)
        step += 1
        if ema is not None:
            ema.update(nets.G_raw, step)
        window.add(stats)
        bar.update(1)

        if measure:
            values = window.means(accelerator)
            counters = data.counters()  # e.g. skipped bad samples: summed over ranks
            if counters:
                totals = torch.tensor(list(counters.values()), device=accelerator.device)
                values.update(zip(counters, accelerator.reduce(totals, "sum").tolist()))
            values.update(
                imgs_per_sec=imgs_per_step * window.steps / (time.perf_counter() - window.start),
                lr_G=nets.sched_G.get_last_lr()[0], lr_D=nets.sched_D.get_last_lr()[0],
                kimg=step * imgs_per_step / 1000, world_size=world,
            )
            logger.scalars(step, values)
            bar.set_postfix(loss_D=f"{values['loss_D']:.3f}", loss_G=f"{values['loss_G']:.3f}",
                            img_s=f"{values['imgs_per_sec']:.0f}")
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            if bad:
                logger.close()
                raise TrainingDiverged(f"non-finite values at step {step}: {bad}; last good "
                                       f"checkpoint: {resolve_resume('auto', run_dir)}")
            window.reset()
            if deadline is not None and _any_rank(accelerator, time.perf_counter() > deadline):
                last_step = step  # out of time: finish here with the usual end-of-run work
                log.info("train.time_limit_min=%s reached at step %d", config.train.time_limit_min, step)

        if step % config.run.sample_every == 0 or step == last_step:
            logger.images(step, "ema" if ema is not None else "G",
                          _generate_grid(ema.model if ema is not None else nets.G_raw, fixed_z))
        if evaluator and (step % config.eval.every == 0 or step == last_step):
            figures = evaluator(ema.model if ema is not None else nets.G_raw, accelerator)
            logger.scalars(step, figures or {}, tb_prefix="eval/")
        if step % config.run.ckpt_every == 0 or step == last_step:
            path = save_checkpoint(accelerator, run_dir, step, trainer_state(), config)
            replicas = check_replicas(accelerator, {"G": nets.G_raw, "D": nets.D_raw})
            logger.event(step, {"event": "checkpoint", "path": str(path), "world_size": world,
                                "replicas_identical": replicas})
            if not all(replicas.values()):
                raise RuntimeError(f"ranks disagree on weights at step {step}: {replicas}")

    bar.close()
    logger.event(step, {"event": "end", "world_size": world})
    logger.close()
    accelerator.end_training()
    return run_dir
