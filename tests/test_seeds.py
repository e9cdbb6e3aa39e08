"""Samples named by seed (issue 34, point 5): --seeds ranges, one image per seed that does not depend
on which other seeds are drawn, and StyleGAN's style-mixing grid."""

from __future__ import annotations

import pytest
import torch

from dist_gan.config import ConfigError, load_config
from dist_gan.models import build_generator
from dist_gan.models.sampling import generate_seeds, parse_ranges
from dist_gan.tools.generate import style_mixing

pytestmark = pytest.mark.tier("unit")


def generator(arch: str, **net) -> torch.nn.Module:
    overrides = {"model.generator.arch": arch, "model.discriminator.arch": arch, "model.generator.width": 4,
                 "model.discriminator.width": 4, "model.z_dim": 16, "data.resolution": 16, "data.channels": 3,
                 "model.discriminator.norm": "none", **{f"model.generator.{k}": v for k, v in net.items()}}
    torch.manual_seed(0)
    return build_generator(load_config(None, overrides))


def test_seed_ranges_parse_in_order_and_bad_ones_name_the_flag():
    assert parse_ranges("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_ranges((5, 2)) == [5, 2] and parse_ranges(9) == [9]
    for bad, message in (("a", "'a' is not a whole number"), ("3-1", "runs backwards"), ("-2", "not a whole number"),
                         ("", "not a whole number")):
        with pytest.raises(ConfigError, match=message):
            parse_ranges(bad, "--seeds")
    with pytest.raises(ConfigError, match="--layers="):
        parse_ranges("x", "--layers")


@pytest.mark.parametrize("arch", ["dcgan", "stylegan2"])
def test_a_seeds_image_is_the_same_whatever_else_is_drawn(arch):
    G = generator(arch)
    if arch == "stylegan2":  # per-pixel noise on, so the noise's seeding is what is tested
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.data.fill_(1.0)
    pair = generate_seeds(G, [3, 7])
    assert torch.equal(generate_seeds(G, [7, 3]), pair.flip(0))
    assert torch.equal(generate_seeds(G, [7]), pair[1:])
    assert not torch.equal(pair[0], pair[1])
    before = torch.random.get_rng_state()
    generate_seeds(G, [1])
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone


def test_style_mixing_grid_takes_the_chosen_layers_from_the_column_seed():
    G = generator("stylegan2")
    images, width = style_mixing(G, rows=[1, 2], cols=[5, 6, 7], layers=list(range(G.num_ws)))
    assert width == 4 and images.shape[0] == 3 * 4
    grid = images.view(3, 4, *images.shape[1:])
    assert torch.equal(grid[0, 0], torch.full_like(grid[0, 0], -1.0))  # the blank corner
    # noise strength starts at 0: with every layer from the column seed, a cell is that seed's image
    assert torch.equal(grid[1, 2], grid[0, 2]) and torch.equal(grid[2, 3], grid[0, 3])
    none, _ = style_mixing(G, rows=[1], cols=[5], layers=[])
    assert torch.equal(none[3], none[2])  # no layer taken: the row seed's image
    coarse, _ = style_mixing(G, rows=[1], cols=[5], layers=[0, 1])
    assert not torch.equal(coarse[3], none[2]) and not torch.equal(coarse[3], coarse[1])
    with pytest.raises(ConfigError, match=f"this generator has layers 0-{G.num_ws - 1}"):
        style_mixing(G, rows=[1], cols=[2], layers=[G.num_ws])
    with pytest.raises(ConfigError, match="needs a generator with a w space"):
        style_mixing(generator("dcgan"), rows=[1], cols=[2], layers=[0])
