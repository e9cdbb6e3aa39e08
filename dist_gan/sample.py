"""``python -m dist_gan.sample RUN_DIR_OR_CHECKPOINT --n=64 --out=grid.png`` (EMA weights by default)."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import fire
import torch
import torch.nn as nn
from torchvision.utils import save_image

from dist_gan.checkpoint import find_checkpoint, load_generator_state
from dist_gan.config import ConfigError, load_config
from dist_gan.models import build_generator

log = logging.getLogger(__name__)


def load_generator(path: str | Path, ema: bool = True) -> tuple[nn.Module, Path]:
    """The generator of a run's newest checkpoint (or of the checkpoint ``path``), in eval mode."""
    checkpoint = find_checkpoint(path)
    config = load_config(checkpoint / "config.yaml")
    generator = build_generator(config)
    generator.load_state_dict(load_generator_state(checkpoint, ema))
    return generator.eval().requires_grad_(False), checkpoint


@torch.no_grad()
def generate(generator: nn.Module, n: int, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """``n`` images in [-1, 1] from latent vectors drawn with ``seed`` (the same seed, the same images)."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator.z_dim, generator=rng)
    return torch.cat([generator(chunk) for chunk in z.split(batch_size)])


def main(checkpoint: str, n: int = 64, out: str = "samples.png", seed: int = 0, raw: bool = False,
         nrow: int | None = None) -> None:
    """Write a grid of ``n`` samples from ``checkpoint`` (a run directory or checkpoint) to ``out``."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        generator, source = load_generator(checkpoint, ema=not raw)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"dist_gan.sample: error: {err}")
    images = generate(generator, n, seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_image(images, out, nrow=nrow or int(math.ceil(math.sqrt(n))), normalize=True,
               value_range=(-1, 1))
    log.info("wrote %d %s samples from %s to %s", n, "raw" if raw else "EMA", source, out)


if __name__ == "__main__":
    fire.Fire(main)
