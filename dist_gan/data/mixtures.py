"""2-D mixtures of Gaussians, the mode-collapse sanity check of VEEGAN and PacGAN (its Table 1).

A sample is a point (x, y), held as a float "image" of shape (2, 1, 1) (two channels, one pixel) so
it goes through the same loop, networks registry, checkpoints and trackers as images do; it is
never quantised to pixels. The label is the mode the point was drawn from.

- ``ring8``: 8 modes on the unit circle, standard deviation 0.01.
- ``grid25``: 25 modes on {-4, -2, 0, 2, 4}^2, standard deviation 0.05.

A set holds ``data.limit`` points (default 100,000, PacGAN's ``num_sample``), drawn with a fixed
seed per split, uniformly over the modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dist_gan.config import POINT_SHAPE, POINT_SOURCES

if TYPE_CHECKING:
    from dist_gan.config import DataConfig

MIXTURE_SIZE = 100_000  # points per training set, as PacGAN's synthetic experiments
MIXTURE_TEST_SIZE = 2_500  # PacGAN's num_log_figure_sample: the samples each evaluation scores
QUALITY_SIGMAS = 3.0  # a sample within this many standard deviations of a mode is of high quality


@dataclass(frozen=True)
class Mixture:
    """Equal-weight isotropic Gaussians at ``means`` (K, 2) with standard deviation ``sigma``;
    ``extent``: half the side of the square a scatter plot of it shows."""

    means: torch.Tensor
    sigma: float
    extent: float

    @property
    def modes(self) -> int:
        return len(self.means)

    def draw(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` points (count, 2) and the index of the mode each came from."""
        generator = torch.Generator().manual_seed(seed)
        modes = torch.randint(0, self.modes, (count,), generator=generator)
        noise = torch.randn(count, 2, generator=generator) * self.sigma
        return self.means[modes] + noise, modes

    def nearest(self, points: torch.Tensor) -> torch.Tensor:
        """The mode of each point (N, 2) within ``QUALITY_SIGMAS`` standard deviations, else -1
        (PacGAN's MetricLogger: the nearest mean, by distance in standard deviations)."""
        distance = torch.cdist(points.double(), self.means.double()) / self.sigma
        best, mode = distance.min(1)
        return torch.where(best < QUALITY_SIGMAS, mode, torch.full_like(mode, -1))


def _ring(count: int, radius: float) -> torch.Tensor:
    angles = torch.arange(count, dtype=torch.float64) * (2 * math.pi / count)
    return (torch.stack([angles.cos(), angles.sin()], 1) * radius).float()


def _grid(values: list[float]) -> torch.Tensor:
    return torch.tensor([[x, y] for x in values for y in values], dtype=torch.float32)


MIXTURES: dict[str, Mixture] = {
    "ring8": Mixture(_ring(8, 1.0), sigma=0.01, extent=1.5),
    "grid25": Mixture(_grid([-4.0, -2.0, 0.0, 2.0, 4.0]), sigma=0.05, extent=6.0),
}
assert tuple(MIXTURES) == POINT_SOURCES, "config.POINT_SOURCES names the mixtures defined here"


def mixture_points(cfg: "DataConfig", split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed point set of ``cfg.source`` for ``split``: float (N, 2, 1, 1) and mode labels;
    ``data.limit`` points for train (default ``MIXTURE_SIZE``), ``MIXTURE_TEST_SIZE`` for test."""
    mixture = MIXTURES[cfg.source]
    count = (cfg.limit or MIXTURE_SIZE) if split == "train" else MIXTURE_TEST_SIZE
    points, modes = mixture.draw(count, seed=0 if split == "train" else 1)
    return points.view(count, *POINT_SHAPE), modes
