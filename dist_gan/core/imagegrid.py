"""Images in [-1, 1] as PNG files: one image, or a grid of them (2-D points: a scatter plot).

The same pixels torchvision's ``make_grid``/``save_image`` write (2-pixel black borders, grey images
as RGB, rounding by +0.5), without importing torchvision: its import pulls in torchvision.models and
torch._dynamo, about a second of every training process's start.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

PADDING = 2


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped; grey images as 3 channels."""
    images = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def make_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> one (3 or C, H', W') image in [0, 1]: ``nrow`` images per row, each
    framed by ``PADDING`` black pixels. A single image (N = 1) comes back without a frame."""
    images = _unit_range(images)
    count, channels, height, width = images.shape
    if count == 1:
        return images[0]
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    grid = torch.zeros(channels, rows * (height + PADDING) + PADDING, columns * (width + PADDING) + PADDING)
    for index, image in enumerate(images):
        top = (index // columns) * (height + PADDING) + PADDING
        left = (index % columns) * (width + PADDING) + PADDING
        grid[:, top:top + height, left:left + width] = image
    return grid


def is_points(samples: torch.Tensor) -> bool:
    """Samples of the 2-D mixtures: (N, 2, 1, 1) points, drawn as a scatter plot, not a grid."""
    return samples.dim() == 4 and tuple(samples.shape[1:]) == (2, 1, 1)


def scatter_plot(points: torch.Tensor, extent: float | None = None, size: int = 512) -> torch.Tensor:
    """(N, 2, 1, 1) points as a (3, size, size) image in [0, 1]: black dots on white over the square
    [-extent, extent]^2 (default: the points' own reach, rounded up), axes through the origin in grey.
    Points outside the square are drawn on its border, so none vanishes."""
    xy = points.detach().float().cpu().flatten(1)
    if extent is None:
        extent = max(1.0, math.ceil(float(xy.abs().max()) * 1.1)) if len(xy) else 1.0
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    middle = size // 2
    draw.line([(middle, 0), (middle, size)], fill=(200, 200, 200))
    draw.line([(0, middle), (size, middle)], fill=(200, 200, 200))
    pixels = ((xy / extent + 1) / 2 * (size - 1)).clamp(0, size - 1)
    for x, y in pixels.tolist():
        draw.rectangle([x - 1, size - 2 - y, x, size - 1 - y], fill="black")  # y grows upwards, as on a plot
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def picture(samples: torch.Tensor, nrow: int = 8, extent: float | None = None) -> torch.Tensor:
    """What a batch of samples looks like, in [0, 1]: a grid of images, or a scatter plot of points."""
    return scatter_plot(samples, extent) if is_points(samples) else make_grid(samples, nrow)


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """A (C, H, W) image in [0, 1] as (H, W, C) uint8."""
    return image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def save_png(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """One image (C, H, W) or a batch (N, C, H, W) in [-1, 1] as a PNG at ``path`` (a grid for N > 1)."""
    save_grid_png(picture(images if images.dim() == 4 else images[None], nrow), path)


def save_grid_png(grid: torch.Tensor, path: str | Path) -> None:
    """A grid already made by ``make_grid`` (in [0, 1]) as a PNG at ``path``."""
    Image.fromarray(to_pixels(grid).numpy()).save(path, format="PNG")
