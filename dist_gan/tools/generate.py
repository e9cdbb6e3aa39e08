"""Generating from a run's checkpoint: its generator, latent walks and their animations, samples by
class, a VAE-GAN's reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from dist_gan.config import ConfigError, load_config
from dist_gan.data import DATA_SOURCES
from dist_gan.data.sources import to_model_range
from dist_gan.models import build_encoder, build_generator
from dist_gan.models.sampling import decode, has_w_space, latent_size, num_classes, seed_latent, seeded_noise
from dist_gan.run.checkpoint import load_encoder_state, load_generator_state
from dist_gan.run.retention import find_checkpoint


def generator_from_checkpoint(path: str | Path, ema: bool = True) -> tuple[nn.Module, Path]:
    """The generator of a run's newest checkpoint (or of the checkpoint ``path``), in eval mode."""
    checkpoint = find_checkpoint(path)
    config = load_config(checkpoint / "config.yaml")
    generator = build_generator(config)
    generator.load_state_dict(load_generator_state(checkpoint, ema))
    return generator.eval().requires_grad_(False), checkpoint


def latent_walk(generator: nn.Module, steps: int, seed: int = 0,
                truncation: float | None = None) -> torch.Tensor:
    """``steps`` images along the great circle (slerp) from the latent of ``seed`` to ``seed + 1``."""
    ends = [torch.randn(1, latent_size(generator), generator=torch.Generator().manual_seed(s))
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
    as_bytes = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = torch.cat([as_bytes, as_bytes.flip(0)[1:-1]]).permute(0, 2, 3, 1).numpy()
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
    z = torch.randn(per_class, latent_size(generator), generator=torch.Generator().manual_seed(seed))
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
def style_mixing(generator: nn.Module, rows: list[int], cols: list[int], layers: list[int],
                 truncation: float | None = None) -> tuple[torch.Tensor, int]:
    """StyleGAN's style-mixing figure: a (rows + 1) x (cols + 1) grid whose first row holds the
    column seeds' images and first column the row seeds' (the corner left blank); cell (r, c) is row
    seed r's image with the w of ``layers`` taken from column seed c (0: the coarsest). Returns the
    images in grid order and the grid's width. Each picture's noise is its row seed's."""
    if not has_w_space(generator):
        raise ConfigError(f"--style_mixing needs a generator with a w space (stylegan2); this one is a "
                          f"{type(generator).__name__}")
    num_ws = int(getattr(generator, "num_ws"))
    outside = [layer for layer in layers if layer >= num_ws]
    if outside:
        raise ConfigError(f"--layers={outside}: this generator has layers 0-{num_ws - 1}")
    mapping, synthesis = getattr(generator, "mapping"), getattr(generator, "synthesis")
    was_training = generator.training
    generator.eval()

    def styles(seed: int) -> torch.Tensor:
        z, labels = seed_latent(generator, seed)
        w = mapping(z, labels)
        if truncation is not None:
            w = mapping.w_avg.to(w.dtype).lerp(w, float(truncation))
        return w[:, None].expand(-1, num_ws, -1)

    def picture(ws: torch.Tensor, seed: int) -> torch.Tensor:
        with seeded_noise(seed):
            return synthesis(ws).float()

    row_ws, col_ws = {s: styles(s) for s in rows}, {s: styles(s) for s in cols}
    first = [picture(col_ws[c], c) for c in cols]
    cells = [torch.full_like(first[0], -1.0), *first]
    chosen = torch.zeros(num_ws, dtype=torch.bool)
    chosen[layers] = True
    for r in rows:
        cells.append(picture(row_ws[r], r))
        cells += [picture(torch.where(chosen[None, :, None], col_ws[c], row_ws[r]), r) for c in cols]
    generator.train(was_training)
    return torch.cat(cells), len(cols) + 1
