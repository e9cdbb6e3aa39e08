"""One training step: ``n_critic`` discriminator updates and one generator update, each over
``optim.accumulate`` micro-batches, with nothing that waits for the device; and the window of
statistics the loop averages at log steps."""

from __future__ import annotations

import time

import torch
import torch.nn as nn
from accelerate import Accelerator

from dist_gan.config import Config
from dist_gan.data import BatchStream
from dist_gan.losses import GANLoss
from dist_gan.run import backend
from dist_gan.run.nets import Nets


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
        applied = torch.stack([torch.isfinite(norm) for norm in norms if norm is not None]).all()
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
    view = nets.loss_view(config.model.z_dim)
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
                d_loss, d_stats = loss.discriminator_loss(view, *batches[-1])
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
    nets.D.set_trainable(False)
    g_side = nets.generator_side()
    for net in g_side:
        net.optimizer.zero_grad(set_to_none=set_to_none)
    g_totals: dict[str, torch.Tensor] = {}
    finite = torch.ones_like(applied)
    for micro, (real, labels) in enumerate(batches):
        with backend.micro_batch(nets.G.accelerator, [n.wrapped for n in g_side], micro == accumulate - 1):
            g_loss, g_stats = loss.generator_loss(view, real, labels)
            finite &= _backward(nets.G.accelerator, g_loss, accumulate, guard)
        for name, value in g_stats.items():
            g_totals[name] = g_totals.get(name, 0.0) + value
    ok, g_norm = _step(nets.G.accelerator, [n.wrapped for n in g_side], [n.optimizer for n in g_side],
                       finite, config, measure)
    applied &= ok
    loss.after_generator_step(nets.G.plain)
    nets.D.set_trainable(True)
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
        self.counts: dict[str, torch.Tensor] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor], applied: torch.Tensor) -> None:
        """Add a step's statistics where ``applied`` (a device bool): a skipped step's NaNs stay out."""
        for name, value in stats.items():
            value = torch.as_tensor(value, dtype=torch.float32, device=applied.device)
            kept = torch.where(applied, value, 0.0)
            self.sums[name] = self.sums[name] + kept if name in self.sums else kept
            self.counts[name] = self.counts[name] + applied.float() if name in self.counts else applied.float()
        self.steps += 1

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over the applied steps and the ranks (NaN for a value no applied step has)."""
        names = sorted(self.sums)
        if not names:
            return {}
        stacked = torch.stack([self.sums[n] / self.counts[n] for n in names])
        return dict(zip(names, accelerator.reduce(stacked, "mean").tolist()))
