"""Freeze-D (issue 34, point 2): model.discriminator.freeze keeps D's first N blocks from the input as
they start, for every architecture with blocks, out of the optimiser; a bad N names the block count."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dist_gan.config import ConfigError, load_config
from dist_gan.models import build_discriminator

from helpers import TINY_SYNTHETIC

pytestmark = pytest.mark.tier("unit")

ARCHS = {"dcgan": 2, "resnet": 3, "stylegan2": 2, "r3gan": 3}  # blocks at 16 px (r3gan: 3 stages)


def discriminator(arch: str, freeze: int, **more) -> torch.nn.Module:
    return build_discriminator(load_config(None, {
        "model.generator.arch": arch, "model.discriminator.arch": arch, "model.discriminator.width": 4,
        "model.generator.width": 4, "data.resolution": 16, "model.discriminator.norm": "none",
        "model.discriminator.freeze": freeze, **more}))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_first_blocks_from_the_input_are_frozen_and_the_rest_trains(arch):
    D = discriminator(arch, 1)
    blocks = D.blocks()
    assert len(blocks) == ARCHS[arch]
    frozen = {id(p) for p in blocks[0].parameters()}
    assert frozen and all(not p.requires_grad for p in blocks[0].parameters())
    rest = [p for p in D.parameters() if id(p) not in frozen]
    assert rest and all(p.requires_grad for p in rest)  # later blocks and the head
    first_input = next(iter(blocks[0].parameters()))
    assert first_input.shape[1] in (1, 3) or first_input.dim() < 4  # block 0 reads the image
    assert all(p.requires_grad for p in discriminator(arch, 0).parameters())


def test_a_freeze_the_network_cannot_give_is_one_line_naming_its_blocks():
    with pytest.raises(ConfigError, match="freeze = 9: this dcgan discriminator has 2 blocks"):
        discriminator("dcgan", 9)
    with pytest.raises(ConfigError, match="a mlp discriminator has no blocks to freeze"):
        discriminator("mlp", 1)
    with pytest.raises(ConfigError, match="freeze.*must be >= 0"):
        discriminator("dcgan", -1)
    with pytest.raises(ConfigError, match="generator.freeze"):
        load_config(None, {"model.generator.freeze": 1})


def test_frozen_blocks_keep_their_weights_through_training_steps_and_stay_out_of_the_optimizer(tmp_path):
    from dist_gan.run import backend
    from dist_gan.run.loop import Run
    from dist_gan.run.step import train_step

    tiny = dict(flag[2:].split("=", 1) for flag in TINY_SYNTHETIC)
    config = load_config("configs/mnist_dcgan.yaml", {**tiny, "run.dir": str(tmp_path / "run"), "run.trackers": "[]",
                                                      "model.discriminator.freeze": 1})
    acc_G, acc_D = backend.make_accelerators(config)
    with contextlib.ExitStack() as stack:
        run = Run(config, acc_G, acc_D, stack)
        D = run.nets.D.plain
        frozen = list(D.blocks()[0].parameters())
        before = [p.detach().clone() for p in frozen]
        trained_before = [p.detach().clone() for p in D.head.parameters()]
        optimised = {id(p) for group in run.nets.D.optimizer.param_groups for p in group["params"]}
        assert not optimised & {id(p) for p in frozen}
        for step in range(3):
            train_step(run.nets, run.loss, run.data, config, measure=False)
        assert all(torch.equal(a, p) for a, p in zip(before, frozen))
        assert all(not p.requires_grad for p in frozen)  # the generator step gave D back its own
        assert any(not torch.equal(a, p) for a, p in zip(trained_before, D.head.parameters()))
