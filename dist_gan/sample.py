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
def generate(generator: nn.Module, n: int, seed: int = 0, batch_size: int = 256,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` images in [-1, 1] (on the CPU) from latents drawn with ``seed``: same seed, same images.

    The generator is in eval mode meanwhile (BatchNorm uses its running statistics).
    """
    z = torch.randn(n, generator.z_dim, generator=torch.Generator().manual_seed(seed))
    return _decode(generator, z, batch_size, device)


def latent_walk(generator: nn.Module, steps: int, seed: int = 0) -> torch.Tensor:
    """``steps`` images along the great circle (slerp) from the latent of ``seed`` to ``seed + 1``."""
    ends = [torch.randn(1, generator.z_dim, generator=torch.Generator().manual_seed(s))
            for s in (seed, seed + 1)]
    a, b = ends
    omega = torch.arccos((a / a.norm() * b / b.norm()).sum().clamp(-1, 1))
    t = torch.linspace(0, 1, steps).unsqueeze(1)
    z = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return _decode(generator, z, steps, "cpu")


@torch.no_grad()
def _decode(generator: nn.Module, z: torch.Tensor, batch_size: int,
            device: torch.device | str) -> torch.Tensor:
    was_training = generator.training
    generator.eval()
    images = torch.cat([generator(chunk.to(device)).float().cpu() for chunk in z.split(batch_size)])
    generator.train(was_training)
    return images


def main(checkpoint: str, n: int = 64, out: str = "samples.png", seed: int = 0, raw: bool = False,
         nrow: int | None = None, out_dir: str | None = None, interpolate: bool = False) -> None:
    """Write ``n`` samples from ``checkpoint`` (a run directory or a checkpoint).

    --out: a grid PNG (default). --out_dir: one PNG per image instead. --interpolate: a latent walk of
    ``n`` steps from the latent of ``seed`` to that of ``seed + 1``. --raw: the trained weights
    instead of their EMA. --seed: which latents (the same seed gives the same images).
    """
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        generator, source = load_generator(checkpoint, ema=not raw)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"dist_gan.sample: error: {err}")
    images = latent_walk(generator, n, seed) if interpolate else generate(generator, n, seed)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            save_image(image, Path(out_dir) / f"{seed:04d}_{index:05d}.png", normalize=True,
                       value_range=(-1, 1))
        target = out_dir
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        rows = nrow or (n if interpolate else int(math.ceil(math.sqrt(n))))
        save_image(images, out, nrow=rows, normalize=True, value_range=(-1, 1))
        target = out
    log.info("wrote %d %s %s from %s to %s", n, "raw" if raw else "EMA",
             "interpolation steps" if interpolate else "samples", source, target)


if __name__ == "__main__":
    fire.Fire(main)
