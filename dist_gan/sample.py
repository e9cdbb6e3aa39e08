"""``python -m dist_gan.sample RUN_DIR_OR_CHECKPOINT --n=64 --out=grid.png`` (EMA weights by default)."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch

from dist_gan.config import ConfigError
from dist_gan.core.imagegrid import save_png
from dist_gan.data import DataError
from dist_gan.models.sampling import generate, generate_seeds, parse_ranges
from dist_gan.tools.generate import by_class, generator_from_checkpoint, latent_walk, reconstructions, write_animation
from dist_gan.tools.generate import style_mixing as style_mixing_grid

log = logging.getLogger(__name__)


def parse_classes(classes) -> list[int]:
    """``--classes=0,1,2`` (fire may hand over an int, a tuple or a string) as whole numbers, or a
    ConfigError naming the value."""
    parts = classes if isinstance(classes, (list, tuple)) else str(classes).split(",")
    wanted = []
    for part in parts:
        text = str(part).strip()
        if isinstance(part, bool) or not text.lstrip("-").isdigit():
            raise ConfigError(f"--classes={classes!r}: {text!r} is not a whole number (e.g. --classes=0,1,2)")
        wanted.append(int(text))
    if not wanted:
        raise ConfigError(f"--classes={classes!r} names no class (e.g. --classes=0,1,2)")
    return wanted


def main(checkpoint: str, n: int = 64, out: str = "samples.png", seed: int = 0, raw: bool = False,
         nrow: int | None = None, out_dir: str | None = None, interpolate: bool = False,
         classes=None, per_class: int = 8, reconstruct: bool = False,
         mnist_dir: str | None = None, gif: str | None = None, mp4: str | None = None,
         truncation: float | None = None, progress: bool = False, seeds=None, style_mixing: bool = False,
         rows=None, cols=None, layers="0-3") -> None:
    """Write ``n`` samples from ``checkpoint`` (a run directory or a checkpoint).

    --out: a grid PNG (default). --out_dir: one PNG per image instead. --interpolate: a latent walk of
    ``n`` steps from the latent of ``seed`` to that of ``seed + 1``; with --gif=walk.gif (or
    --mp4=walk.mp4, needs imageio[ffmpeg]) as an animation instead of a strip. --raw: the trained weights
    instead of their EMA. --seed: which latents (the same seed gives the same images).
    --classes=0,1,2: a conditional model's samples, one row of ``per_class`` per class.
    --reconstruct: a VAE-GAN's reconstructions of ``n`` test images (rows of inputs, then of their
    reconstructions; --mnist_dir if the run's data.mnist_dir is not here).
    --truncation=0.7: fidelity for variety (stylegan2: w towards its average by psi; the others: z
    truncated at that threshold, as BigGAN).
    --seeds=0-35,40: one image per seed, in that order (a grid, or with --out_dir one PNG per seed,
    seedNNNN.png): the same seed gives the same image on any machine and whatever else is drawn.
    --style_mixing --rows=SEEDS --cols=SEEDS --layers=0-3 (stylegan2): the style-mixing grid, each
    row seed's image with the w of --layers (0: the coarsest) taken from each column seed.
    --progress: the run's training as a picture: its fixed-noise grids as one animation (--gif=, default
    progress.gif; or --mp4=), each frame labelled with its step and kimg (written at the end of
    every run as RUN_DIR/progress.gif too).
    """
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if progress:
        from dist_gan.tools.progress import write_progress

        try:
            written = write_progress(checkpoint, mp4 or gif or "progress.gif")
        except (ConfigError, OSError) as err:
            sys.exit(f"dist_gan.sample: error: {getattr(err, 'strerror', None) or err}")
        log.info("wrote the training progress of %s to %s", checkpoint, written)
        return
    for name, value in (("n", n), ("per_class", per_class), ("nrow", 1 if nrow is None else nrow)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            sys.exit(f"dist_gan.sample: error: --{name}={value!r} must be a whole number >= 1")
    if (seeds is not None or style_mixing) and (interpolate or reconstruct or classes is not None):
        sys.exit("dist_gan.sample: error: --seeds and --style_mixing make samples of their own; "
                 "--interpolate, --reconstruct and --classes take --seed")
    names = None
    try:
        generator, source = generator_from_checkpoint(checkpoint, ema=not raw)
        if style_mixing or seeds is not None:
            images, width, names = _by_seed(generator, seeds, style_mixing, rows, cols, layers, truncation)
            nrow = width or nrow
        elif classes is not None:
            wanted = parse_classes(classes)
            images, nrow = by_class(generator, wanted, per_class, seed, truncation), per_class
        elif reconstruct:
            images, nrow = reconstructions(source, generator, n, mnist_dir), 8
        elif interpolate:
            images = latent_walk(generator, n, seed, truncation)
        else:
            images = generate(generator, n, seed, truncation=truncation)
    except (ConfigError, DataError, FileNotFoundError) as err:
        sys.exit(f"dist_gan.sample: error: {err}")
    n = len(images)
    animation = gif or mp4
    if animation:
        if not interpolate:
            sys.exit("dist_gan.sample: error: --gif/--mp4 animate a latent walk: add --interpolate")
        try:
            write_animation(images, animation)
        except ConfigError as err:
            sys.exit(f"dist_gan.sample: error: {err}")
        log.info("wrote a %d-step latent walk from %s to %s", n, source, animation)
        return
    try:
        names = names or [f"{seed:04d}_{index:05d}.png" for index in range(n)]
        rows_of = nrow or (n if interpolate else int(math.ceil(math.sqrt(n))))
        target = _write_images(images, out, out_dir, names, rows_of)
    except (OSError, ValueError) as err:  # read-only, a folder named as the file, an unknown suffix
        where = f"--out_dir={out_dir}" if out_dir else f"--out={out}"
        sys.exit(f"dist_gan.sample: error: cannot write {where}: {getattr(err, 'strerror', None) or err}")
    log.info("wrote %d %s %s from %s to %s", n, "raw" if raw else "EMA",
             "interpolation steps" if interpolate else "samples", source, target)


def _by_seed(generator, seeds, style_mixing: bool, rows, cols, layers,
             truncation: float | None) -> tuple[torch.Tensor, int | None, list[str] | None]:
    """--style_mixing's grid, or --seeds' images: (images, grid width or None, file names or None)."""
    if style_mixing:
        if rows is None or cols is None:
            raise ConfigError("--style_mixing needs --rows=SEEDS and --cols=SEEDS (e.g. --rows=0-3 --cols=10-13)")
        images, width = style_mixing_grid(generator, parse_ranges(rows, "--rows"), parse_ranges(cols, "--cols"),
                                          parse_ranges(layers, "--layers"), truncation)
        return images, width, None
    chosen = parse_ranges(seeds, "--seeds")
    return generate_seeds(generator, chosen, truncation), None, [f"seed{s:04d}.png" for s in chosen]


def _write_images(images: torch.Tensor, out: str, out_dir: str | None, names: list[str], rows: int) -> str:
    """A grid PNG at ``out``, or one PNG per image in ``out_dir`` named ``names``; returns where."""
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for image, name in zip(images, names):
            save_png(image, Path(out_dir) / name)
        return out_dir
    if Path(out).is_dir():
        raise IsADirectoryError(f"{out} is a folder: name a file (or use --out_dir)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_png(images, out, nrow=rows)
    return out


if __name__ == "__main__":
    from dist_gan.core.cliargs import run_command

    run_command(main, "dist_gan.sample")
