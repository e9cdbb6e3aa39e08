"""``python -m dist_gan.sample RUN_DIR_OR_CHECKPOINT --n=64 --out=grid.png`` (EMA weights by default)."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

from dist_gan.retention import find_checkpoint
from dist_gan.checkpoint import load_encoder_state, load_generator_state
from dist_gan.config import ConfigError, DataConfig, load_config
from dist_gan.data import DATA_SOURCES, DataError
from dist_gan.data.mixtures import MIXTURES
from dist_gan.data.sources import to_model_range
from dist_gan.imagegrid import save_png
from dist_gan.models import build_encoder, build_generator

log = logging.getLogger(__name__)


def load_generator(path: str | Path, ema: bool = True) -> tuple[nn.Module, Path]:
    """The generator of a run's newest checkpoint (or of the checkpoint ``path``), in eval mode."""
    checkpoint = find_checkpoint(path)
    config = load_config(checkpoint / "config.yaml")
    generator = build_generator(config)
    generator.load_state_dict(load_generator_state(checkpoint, ema))
    return generator.eval().requires_grad_(False), checkpoint


def num_classes(generator: nn.Module) -> int:
    """How many classes a conditional generator knows; 0 for an unconditional one."""
    if isinstance(getattr(generator, "num_classes", None), int):
        return generator.num_classes
    embed = getattr(getattr(generator, "condition", None), "embed", None)
    return embed.num_embeddings if embed is not None else 0


def truncate_latents(z: torch.Tensor, threshold: float, seed: int = 0) -> torch.Tensor:
    """BigGAN's truncation trick: entries of ``z`` outside [-threshold, threshold] are drawn again
    (from ``seed``) until none is, i.e. z from a normal truncated at the threshold."""
    rng = torch.Generator().manual_seed(seed)
    z = z.clone()
    outside = z.abs() > threshold
    while outside.any():
        z[outside] = torch.randn(int(outside.sum()), generator=rng, dtype=z.dtype)
        outside = z.abs() > threshold
    return z


def has_w_space(generator: nn.Module) -> bool:
    """Whether the generator truncates in its own w space (StyleGAN2's mapping with ``w_avg``)."""
    return hasattr(getattr(generator, "mapping", None), "w_avg")


@torch.no_grad()
def generate(generator: nn.Module, n: int, seed: int = 0, batch_size: int = 256,
             device: torch.device | str = "cpu", labels: torch.Tensor | None = None,
             truncation: float | None = None) -> torch.Tensor:
    """``n`` images in [-1, 1] (on the CPU) from latents drawn with ``seed``: same seed, same images.

    A conditional generator draws each image's class uniformly (from the same seed) unless ``labels``
    names them. The generator is in eval mode meanwhile (BatchNorm uses its running statistics).
    """
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator.z_dim, generator=rng)
    classes = num_classes(generator)
    if classes and labels is None:
        labels = torch.randint(0, classes, (n,), generator=rng)
    return decode(generator, z, batch_size, device, labels, truncation)


def latent_walk(generator: nn.Module, steps: int, seed: int = 0,
                truncation: float | None = None) -> torch.Tensor:
    """``steps`` images along the great circle (slerp) from the latent of ``seed`` to ``seed + 1``."""
    ends = [torch.randn(1, generator.z_dim, generator=torch.Generator().manual_seed(s))
            for s in (seed, seed + 1)]
    a, b = ends
    omega = torch.arccos((a / a.norm() * b / b.norm()).sum().clamp(-1, 1))
    t = torch.linspace(0, 1, steps).unsqueeze(1)
    z = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    labels = torch.zeros(steps, dtype=torch.long) if num_classes(generator) else None
    return decode(generator, z, steps, "cpu", labels, truncation)


def write_animation(frames: torch.Tensor, path: str | Path, fps: int = 12) -> None:
    """Frames in [-1, 1] (N, C, H, W) as an animated GIF, or an MP4 when ``path`` ends in .mp4
    (needs the optional ``imageio[ffmpeg]``); the walk plays forth and back so it loops smoothly."""
    pixels = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = torch.cat([pixels, pixels.flip(0)[1:-1]]).permute(0, 2, 3, 1).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".mp4"):
        try:
            import imageio.v3 as iio
        except ImportError:
            raise ConfigError("--mp4 needs imageio with ffmpeg: pip install 'imageio[ffmpeg]' "
                              "(or write --gif=walk.gif)") from None
        iio.imwrite(path, pixels if pixels.shape[-1] == 3 else pixels.repeat(3, -1), fps=fps)
        return
    from PIL import Image

    images = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def by_class(generator: nn.Module, classes: list[int], per_class: int, seed: int = 0,
             truncation: float | None = None) -> torch.Tensor:
    """``per_class`` images of each class in turn (one grid row per class), the same latents per row."""
    if not num_classes(generator):
        raise ConfigError("--classes needs a class-conditional model (model.num_classes > 0)")
    bad = [c for c in classes if not 0 <= c < num_classes(generator)]
    if bad:
        raise ConfigError(f"--classes {bad}: this model knows classes 0..{num_classes(generator) - 1}")
    z = torch.randn(per_class, generator.z_dim, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor(classes).repeat_interleave(per_class)
    return decode(generator, z.repeat(len(classes), 1), 256, "cpu", labels, truncation)


@torch.no_grad()
def reconstructions(checkpoint: Path, generator: nn.Module, n: int,
                mnist_dir: str | None = None) -> torch.Tensor:
    """VAE-GAN: the first ``n`` test images, each row of inputs followed by a row of their
    reconstructions G(mu(E(x)))."""
    config = load_config(checkpoint / "config.yaml")
    encoder = build_encoder(config)
    if encoder is None:
        raise ConfigError(f"{checkpoint} is not a VAE-GAN checkpoint (model.encoder.arch is none)")
    encoder.load_state_dict(load_encoder_state(checkpoint))
    encoder.eval()
    if mnist_dir:
        config.data.mnist_dir = mnist_dir
    images = DATA_SOURCES[config.data.source](config.data, "test")
    real = to_model_range(torch.stack([images[i][0] for i in range(n)]))
    labels = torch.tensor([images[i][1] for i in range(n)]) if num_classes(generator) else None
    recon = decode(generator, encoder(real)[0], 256, "cpu", labels)
    rows = [t for i in range(0, n, 8) for t in (real[i:i + 8], recon[i:i + 8])]
    return torch.cat(rows)


@torch.no_grad()
def decode(generator: nn.Module, z: torch.Tensor, batch_size: int, device: torch.device | str,
           labels: torch.Tensor | None = None, truncation: float | None = None) -> torch.Tensor:
    """Images (fp32, on the CPU) of latents ``z`` (and ``labels``) in batches, the generator in eval
    mode meanwhile (BatchNorm uses its running statistics); any weight dtype.

    ``truncation`` (None: off) trades variety for fidelity: for a generator with a w space
    (stylegan2) w is pulled towards the average w, psi = ``truncation`` (1: none); for the others z
    is truncated at that threshold (BigGAN's trick: 0.5 to 1 is typical)."""
    extra = {}
    if truncation is not None:
        if not isinstance(truncation, (int, float)) or isinstance(truncation, bool) or not (
                math.isfinite(truncation) and truncation > 0):
            raise ConfigError(f"--truncation={truncation!r} must be a finite number > 0")
        if has_w_space(generator):
            extra = {"truncation": float(truncation)}
        else:
            z = truncate_latents(z.cpu(), float(truncation)).to(z.device)
    was_training = generator.training
    generator.eval()
    label_chunks = labels.split(batch_size) if labels is not None else [None] * len(z.split(batch_size))
    images = torch.cat([
        generator(chunk.to(device), None if y is None else y.to(device), **extra).float().cpu()
        for chunk, y in zip(z.split(batch_size), label_chunks)])
    generator.train(was_training)
    return images


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
         truncation: float | None = None, progress: bool = False) -> None:
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
    --progress: the run's training as a picture: its fixed-noise grids as one animation (--gif=, default
    progress.gif; or --mp4=), each frame labelled with its step and kimg (written at the end of
    every run as RUN_DIR/progress.gif too).
    """
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if progress:
        from dist_gan.progress import write_progress

        try:
            written = write_progress(checkpoint, mp4 or gif or "progress.gif")
        except (ConfigError, OSError) as err:
            sys.exit(f"dist_gan.sample: error: {getattr(err, 'strerror', None) or err}")
        log.info("wrote the training progress of %s to %s", checkpoint, written)
        return
    for name, value in (("n", n), ("per_class", per_class), ("nrow", 1 if nrow is None else nrow)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            sys.exit(f"dist_gan.sample: error: --{name}={value!r} must be a whole number >= 1")
    try:
        generator, source = load_generator(checkpoint, ema=not raw)
        if classes is not None:
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
        target = _write_images(images, out, out_dir, seed, nrow or (n if interpolate else int(math.ceil(math.sqrt(n)))))
    except (OSError, ValueError) as err:  # read-only, a folder named as the file, an unknown suffix
        where = f"--out_dir={out_dir}" if out_dir else f"--out={out}"
        sys.exit(f"dist_gan.sample: error: cannot write {where}: {getattr(err, 'strerror', None) or err}")
    log.info("wrote %d %s %s from %s to %s", n, "raw" if raw else "EMA",
             "interpolation steps" if interpolate else "samples", source, target)


SAMPLE_GRID_SIZE = 64  # images in a run's sample grids
SAMPLE_POINTS = 1000  # points in a 2-D mixture run's scatter plots


def sample_count(data: DataConfig) -> int:
    """Samples in each of a run's sample pictures: a grid of images, or a scatter plot of points."""
    return SAMPLE_POINTS if data.source in MIXTURES else SAMPLE_GRID_SIZE


def picture_extent(data: DataConfig) -> float | None:
    """The half-width of a 2-D mixture's scatter plots (the same square in every picture of a run)."""
    return MIXTURES[data.source].extent if data.source in MIXTURES else None


def sample_grid(generator: nn.Module, fixed_z: torch.Tensor, num_classes: int,
                   truncation: float | None = None) -> torch.Tensor:
    """The sample grid: fixed latents; for a conditional model row r (of 8) shows class r."""
    labels = torch.arange(len(fixed_z), device=fixed_z.device) // 8 % num_classes if num_classes else None
    return decode(generator, fixed_z, len(fixed_z), fixed_z.device, labels, truncation)


def _write_images(images: torch.Tensor, out: str, out_dir: str | None, seed: int, rows: int) -> str:
    """A grid PNG at ``out``, or one PNG per image in ``out_dir``; returns where."""
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            save_png(image, Path(out_dir) / f"{seed:04d}_{index:05d}.png")
        return out_dir
    if Path(out).is_dir():
        raise IsADirectoryError(f"{out} is a folder: name a file (or use --out_dir)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_png(images, out, nrow=rows)
    return out


if __name__ == "__main__":
    from dist_gan.cliargs import run_command

    run_command(main, "dist_gan.sample")
