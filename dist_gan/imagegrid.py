"""Images in [-1, 1] as PNG files: one image, or a grid of them.

The same pixels torchvision's ``make_grid``/``save_image`` write (2-pixel black borders, grey images
as RGB, rounding by +0.5), without importing torchvision: its import pulls in torchvision.models and
torch._dynamo, about a second of every training process's start.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

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


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """A (C, H, W) image in [0, 1] as (H, W, C) uint8."""
    return image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def save_png(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """One image (C, H, W) or a batch (N, C, H, W) in [-1, 1] as a PNG at ``path`` (a grid for N > 1)."""
    save_grid_png(make_grid(images if images.dim() == 4 else images[None], nrow), path)


def save_grid_png(grid: torch.Tensor, path: str | Path) -> None:
    """A grid already made by ``make_grid`` (in [0, 1]) as a PNG at ``path``."""
    Image.fromarray(to_pixels(grid).numpy()).save(path, format="PNG")
