"""Speed switches change speed, not results: each one trains to the same weights as the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dist_gan.config import ConfigError, load_config
from dist_gan.data import InMemoryBatches
from dist_gan.losses import build_loss
from dist_gan.run import backend
from dist_gan.run.nets import build_nets
from dist_gan.run.step import train_step

pytestmark = pytest.mark.tier("unit")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_wgangp.yaml"
TINY = {"data.format": "memory", "data.batch_size": 8, "model.generator.width": 8,
        "model.discriminator.width": 8, "model.z_dim": 16, "optim.n_critic": 2,
        "optim.g_lr": 1e-3, "optim.d_lr": 1e-3}


def weights_after_steps(overrides: dict, steps: int = 3) -> list[torch.Tensor]:
    config = load_config(CONFIG, {**TINY, **overrides})
    backend.set_backend_flags(config.speed)  # as train() does: the switch must really be thrown
    accelerator = Accelerator(cpu=True)
    nets = build_nets(config, accelerator)
    loss = build_loss(config.loss, accelerator.autocast)
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    data = InMemoryBatches(images, torch.zeros(64, dtype=torch.long), 8, seed=0)
    set_seed(0)
    for _ in range(steps):
        train_step(nets, loss, data, config, measure=True)
    return [p.detach().clone() for p in [*nets.G.plain.parameters(), *nets.D.plain.parameters()]]


@pytest.fixture(scope="module")
def baseline() -> list[torch.Tensor]:
    return weights_after_steps({})


@pytest.mark.parametrize("overrides", [
    {"speed.channels_last": False},
    {"speed.adam_impl": "for_loop"},
    {"speed.adam_impl": "foreach"},
    {"speed.adam_impl": "fused"},
    {"speed.zero_grad_set_to_none": False},
    {"speed.tf32": False, "speed.cudnn_benchmark": False},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_switch_trains_to_the_same_weights(baseline, overrides):
    try:
        changed = weights_after_steps(overrides)
        if "speed.tf32" in overrides:  # the flags were set as the config says (they only act on CUDA)
            assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.benchmark is False
    finally:
        backend.set_backend_flags(load_config(CONFIG).speed)
    moved = max((b - a).abs().max().item() for a, b in zip(baseline, weights_after_steps({}, steps=0)))
    assert moved > 1e-3  # the steps really moved the weights, so agreement below means something
    for a, b in zip(baseline, changed):
        # equal up to the order of float sums: the kernels differ (and with them the thread split),
        # so a few weights differ in the fifth decimal after these steps; a broken switch moves them
        # as far as training does (> 1e-3)
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@pytest.mark.tier("e2e")
@pytest.mark.slow
def test_compile_trains_to_the_same_weights_with_the_penalty(baseline):
    """torch.compile'd G and D (inductor on CPU), the WGAN-GP double backward through eager D."""
    compiled = weights_after_steps({"speed.compile": True})
    for a, b in zip(baseline, compiled):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def test_unknown_adam_impl_is_named():
    with pytest.raises(ConfigError, match="speed.adam_impl"):
        load_config(CONFIG, {"speed.adam_impl": "turbo"})
