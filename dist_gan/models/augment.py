"""Differentiable augmentation of every image the discriminator sees: DiffAugment and ADA.

With little data, D memorises the training set and its feedback to G becomes useless. Zhao et al.
2020 (DiffAugment) and Karras et al. 2020 (StyleGAN2-ADA) show D only augmented images, real and
fake alike, through transforms G can be differentiated through, so that what D learns to tell apart
is the data's distribution and not the augmentation (which leaks into G's images only if p nears 1).

- ``DiffAugment``: the paper's three groups (``color``, ``translation``, ``cutout``), each transform
  applied to an image with probability p (the paper: p = 1, always).
- ``AdaptiveAugment``: ADA's pipeline groups ``blit`` (x-flip, 90-degree rotations, integer
  translation), ``geom`` (isotropic scaling, rotation, anisotropic scaling, fractional translation;
  one bilinear resampling with reflection padding) and ``color`` (brightness, contrast, luma flip,
  hue rotation, saturation; one 4x4 matrix in RGB), each transform applied with probability p. p
  moves towards the over-fitting heuristic's target: ``adjust`` is called at every log step with
  r_t = E[sign(D(real))] from the loop's reduction (identical on every rank), so p never needs a
  sync of its own. How far it moves is proportional to the real images D saw since the last call.

A transform draws its parameters from torch's global generator on the images' device, so a run (and
a resume, which restores those generators) draws the same augmentations. An image whose transforms
were all skipped is returned bit for bit (``torch.where``, never a resampling at identity).
Images are (N, C, H, W) in [-1, 1]; C = 1 (colour transforms act on grey replicated to RGB and
averaged back) or 3. Geometric transforms keep values within the input's range; colour transforms,
as in both papers, may leave [-1, 1].
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_gan.config import AugmentConfig

Transform = Callable[[torch.Tensor, float], torch.Tensor]


def _chosen(n: int, p: float, device: torch.device) -> torch.Tensor:
    """(n,) bool: which images get a transform applied with probability ``p``."""
    return torch.rand(n, device=device) < p


def _per_image(flags: torch.Tensor) -> torch.Tensor:
    return flags.view(-1, 1, 1, 1)


def _sample_at(images: torch.Tensor, matrix: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """``images`` resampled at ``matrix`` (N x 3 x 3, output -> input in normalised coordinates)."""
    grid = F.affine_grid(matrix[:, :2, :].to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode=padding, align_corners=False)


def _translation_matrix(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    m = torch.eye(3, device=tx.device).repeat(len(tx), 1, 1)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


# --- DiffAugment (Zhao et al. 2020) -------------------------------------------------------------------

def diff_color(images: torch.Tensor, p: float) -> torch.Tensor:
    """Brightness (+U(-0.5, 0.5)), saturation (x U(0, 2) about the pixel's channel mean) and
    contrast (x U(0.5, 1.5) about the image's mean), each with probability ``p``."""
    n, device = images.shape[0], images.device
    shape = (n, 1, 1, 1)
    x = images
    on = _per_image(_chosen(n, p, device))
    x = torch.where(on, x + (torch.rand(shape, device=device) - 0.5), x)
    on = _per_image(_chosen(n, p, device))
    mean = x.mean(1, keepdim=True)
    x = torch.where(on, (x - mean) * (torch.rand(shape, device=device) * 2) + mean, x)
    on = _per_image(_chosen(n, p, device))
    mean = x.mean((1, 2, 3), keepdim=True)
    return torch.where(on, (x - mean) * (torch.rand(shape, device=device) + 0.5) + mean, x)


def diff_translation(images: torch.Tensor, p: float, ratio: float = 0.125) -> torch.Tensor:
    """A shift by a whole number of pixels up to ``ratio`` of the size in each direction, the
    uncovered border zero (the grey of [-1, 1]), with probability ``p``."""
    n, _, h, w = images.shape
    device = images.device
    limit_y, limit_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-limit_y, limit_y + 1, (n,), device=device)
    dx = torch.randint(-limit_x, limit_x + 1, (n,), device=device)
    on = _chosen(n, p, device)
    # sampling at (x - dx): the content moves by +dx; nearest sampling of whole-pixel shifts is exact
    matrix = _translation_matrix(-2.0 * dx / w, -2.0 * dy / h)
    shifted = _sample_at(images, matrix, mode="nearest", padding="zeros")
    return torch.where(_per_image(on), shifted, images)


def diff_cutout(images: torch.Tensor, p: float, ratio: float = 0.5) -> torch.Tensor:
    """A square of ``ratio`` of the size, at a random centre, set to zero, with probability ``p``."""
    n, _, h, w = images.shape
    device = images.device
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - size_y % 2), (n, 1, 1), device=device) - size_y // 2
    left = torch.randint(0, w + (1 - size_x % 2), (n, 1, 1), device=device) - size_x // 2
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)
    cut = inside & _chosen(n, p, device).view(n, 1, 1)
    return images * (~cut).unsqueeze(1).to(images.dtype)


DIFFAUGMENT_GROUPS: dict[str, Transform] = {
    "color": diff_color,
    "translation": diff_translation,
    "cutout": diff_cutout,
}


# --- ADA (Karras et al. 2020) -------------------------------------------------------------------------

def _rotation(angle_cos: torch.Tensor, angle_sin: torch.Tensor) -> torch.Tensor:
    m = torch.eye(3, device=angle_cos.device).repeat(len(angle_cos), 1, 1)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = angle_cos, -angle_sin, angle_sin, angle_cos
    return m


def _scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = torch.eye(3, device=sx.device).repeat(len(sx), 1, 1)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def _where_matrix(on: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(matrix.shape[-1], device=matrix.device).expand_as(matrix)
    return torch.where(on.view(-1, 1, 1), matrix, eye)


def blit_matrices(n: int, p: float, device: torch.device, pixels: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """ADA's pixel blitting as sampling matrices: x-flip, a rotation by a multiple of 90 degrees,
    an integer translation of up to 1/8 of the size (``pixels``); each with probability ``p``."""
    matrices, applied = [], torch.zeros(n, dtype=torch.bool, device=device)
    on = _chosen(n, p, device)
    flip = 1.0 - 2.0 * torch.randint(0, 2, (n,), device=device).float()
    matrices.append(_where_matrix(on, _scaling(flip, torch.ones_like(flip))))
    applied |= on
    on = _chosen(n, p, device)
    quarter = torch.randint(0, 4, (n,), device=device)
    table_cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)
    table_sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)
    matrices.append(_where_matrix(on, _rotation(table_cos[quarter], table_sin[quarter])))
    applied |= on
    on = _chosen(n, p, device)
    shift = ((torch.rand(n, 2, device=device) * 2 - 1) * 0.125 * pixels).round() * 2 / pixels
    matrices.append(_where_matrix(on, _translation_matrix(shift[:, 0], shift[:, 1])))
    return matrices, applied | on


def geometric_matrices(n: int, p: float, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """ADA's general geometric transforms as sampling matrices: isotropic scaling (lognormal, std
    0.2 octaves), a rotation (uniform), anisotropic scaling (0.2 octaves), a second rotation and a
    fractional translation (normal, std 1/8 of the size). Each with probability ``p``, the rotations
    with 1 - sqrt(1 - p) each, so that the image is rotated at all with probability ``p``."""
    matrices, applied = [], torch.zeros(n, dtype=torch.bool, device=device)
    p_rotation = 1.0 - math.sqrt(max(1.0 - p, 0.0))

    def add(on: torch.Tensor, matrix: torch.Tensor) -> None:
        nonlocal applied
        matrices.append(_where_matrix(on, matrix))
        applied = applied | on

    scale = torch.exp2(torch.randn(n, device=device) * 0.2)
    add(_chosen(n, p, device), _scaling(scale, scale))
    angle = (torch.rand(n, device=device) * 2 - 1) * math.pi
    add(_chosen(n, p_rotation, device), _rotation(angle.cos(), angle.sin()))
    scale = torch.exp2(torch.randn(n, device=device) * 0.2)
    add(_chosen(n, p, device), _scaling(scale, 1.0 / scale))
    angle = (torch.rand(n, device=device) * 2 - 1) * math.pi
    add(_chosen(n, p_rotation, device), _rotation(angle.cos(), angle.sin()))
    shift = torch.randn(n, 2, device=device) * 0.125 * 2  # normalised coordinates span 2
    add(_chosen(n, p, device), _translation_matrix(shift[:, 0], shift[:, 1]))
    return matrices, applied


LUMA_AXIS = (1 / math.sqrt(3),) * 3


def color_matrix(n: int, p: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ADA's colour transforms as one (n, 4, 4) matrix on homogeneous RGB: brightness (+N(0, 0.2)),
    contrast (x lognormal, 0.5 octaves), luma flip, hue rotation about the luma axis (uniform) and
    saturation (lognormal, 1 octave), each with probability ``p``; and which images got any."""
    eye = torch.eye(4, device=device)
    axis = torch.tensor([*LUMA_AXIS, 0.0], device=device)
    luma = torch.outer(axis, axis)
    total = eye.repeat(n, 1, 1)
    applied = torch.zeros(n, dtype=torch.bool, device=device)

    def add(matrix: torch.Tensor) -> None:
        nonlocal total, applied
        on = _chosen(n, p, device)
        total = _where_matrix(on, matrix) @ total
        applied = applied | on

    brightness = eye.repeat(n, 1, 1)
    brightness[:, :3, 3] = torch.randn(n, 1, device=device) * 0.2
    add(brightness)
    contrast = torch.exp2(torch.randn(n, device=device) * 0.5)
    add(torch.diag_embed(torch.stack([contrast, contrast, contrast, torch.ones_like(contrast)], 1)))
    flip = torch.randint(0, 2, (n, 1, 1), device=device).float()
    add(eye - 2 * luma * flip)
    angle = ((torch.rand(n, device=device) * 2 - 1) * math.pi).view(n, 1, 1)
    cross = torch.zeros(4, 4, device=device)  # the cross-product matrix of the luma axis
    a = LUMA_AXIS[0]
    cross[0, 1], cross[0, 2], cross[1, 0], cross[1, 2], cross[2, 0], cross[2, 1] = -a, a, a, -a, -a, a
    rgb = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], device=device))
    hue = eye + (angle.cos() - 1) * (rgb - luma) + angle.sin() * cross  # Rodrigues about the axis
    add(hue)
    saturation = torch.exp2(torch.randn(n, device=device)).view(n, 1, 1)
    add(luma + (eye - luma) * saturation + (eye - rgb) * (1 - saturation))
    return total, applied


def apply_color(images: torch.Tensor, matrix: torch.Tensor, applied: torch.Tensor) -> torch.Tensor:
    """``images`` through the colour ``matrix`` where ``applied``; grey images as RGB, then averaged."""
    n, channels, h, w = images.shape
    rgb = images.expand(n, 3, h, w) if channels == 1 else images
    out = matrix[:, :3, :3] @ rgb.reshape(n, 3, h * w) + matrix[:, :3, 3:]
    out = out.reshape(n, 3, h, w)
    if channels == 1:
        out = out.mean(1, keepdim=True)
    return torch.where(_per_image(applied), out, images)


def ada_pipeline(images: torch.Tensor, p: float, groups: list[str]) -> torch.Tensor:
    """``images`` through ADA's ``groups`` at probability ``p``: the blit and geometric transforms
    composed into one resampling (bilinear, reflection padding), then the colour matrix."""
    n, _, h, w = images.shape
    device = images.device
    if h != w:
        raise ValueError(f"ADA's geometric transforms need square images, got {h} x {w}")
    matrices, moved = [], torch.zeros(n, dtype=torch.bool, device=device)
    if "blit" in groups:
        found, on = blit_matrices(n, p, device, w)
        matrices += found
        moved |= on
    if "geom" in groups:
        found, on = geometric_matrices(n, p, device)
        matrices += found
        moved |= on
    if matrices:
        total = matrices[0]
        for matrix in matrices[1:]:
            total = total @ matrix
        warped = _sample_at(images, total, mode="bilinear", padding="reflection")
        images = torch.where(_per_image(moved), warped, images)
    if "color" in groups:
        images = apply_color(images, *color_matrix(n, p, device))
    return images


# --- what the loop holds ------------------------------------------------------------------------------

class Augmentation:
    """One run's augmentation: called on every batch D sees; p is a float, the same on every rank."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg, self.groups, self.p = cfg, cfg.groups(), cfg.start_p()

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Augmented ``images``, computed in fp32 whatever the surrounding autocast."""
        with torch.autocast(images.device.type, enabled=False):
            return self.transform(images.float())

    def adjust(self, real_sign: float, real_images: int) -> None:
        """Called at each log step with E[sign(D(real))] over the window and the real images D saw
        in it (every rank passes the same values). Fixed-p augmentations ignore it."""

    def state_dict(self) -> dict:
        return {"p": self.p}

    def load_state_dict(self, state: dict) -> None:
        self.p = float(state["p"])

    def replica_values(self) -> dict[str, float]:
        """p is agreed by arithmetic on values reduced over ranks; a save checks it is."""
        return {"augment_p": self.p}

    def log_values(self, window: dict[str, float], real_images: int) -> dict[str, float]:
        """At a log step: ``adjust`` on the window's E[sign(D(real))] (reduced over ranks)."""
        self.adjust(window.get("D_real_sign", math.nan), real_images)
        return {"augment_p": self.p}


class DiffAugment(Augmentation):
    """Zhao et al.'s DiffAugment: the policy's groups in order, each transform with probability p."""

    def transform(self, images):
        for group in self.groups:
            images = DIFFAUGMENT_GROUPS[group](images, self.p)
        return images


class AdaptiveAugment(Augmentation):
    """Karras et al.'s ADA: the pipeline at probability p, p tuned by r_t = E[sign(D(real))]: up
    when r_t is above ``augment.target`` (D is sure of the reals: over-fitting), down when below, by
    (real images seen) / (speed_kimg x 1000), within [0, 1]. ``target: null`` keeps p fixed."""

    def transform(self, images):
        return ada_pipeline(images, self.p, self.groups)

    def adjust(self, real_sign, real_images):
        if self.cfg.target is None or not math.isfinite(real_sign):
            return
        step = math.copysign(real_images / (self.cfg.speed_kimg * 1000), real_sign - self.cfg.target)
        if real_sign == self.cfg.target:
            step = 0.0
        self.p = min(max(self.p + step, 0.0), 1.0)


AUGMENTATIONS: dict[str, type[Augmentation]] = {"diffaugment": DiffAugment, "ada": AdaptiveAugment}


def build_augmentation(cfg: AugmentConfig) -> Augmentation | None:
    """The augmentation ``augment.kind`` names, or None for ``none``."""
    return AUGMENTATIONS[cfg.kind](cfg) if cfg.kind != "none" else None


class AugmentedDiscriminator(nn.Module):
    """D as a loss sees it under augmentation: every image (real, fake, a penalty's input) is
    augmented first, inside the graph, so G and the penalties differentiate through it. A view built
    per step; D's parameters are its own (``parameters()`` reaches them), no state is added to D."""

    def __init__(self, discriminator: nn.Module, augmentation: Augmentation):
        super().__init__()
        self.discriminator = discriminator
        self.augmentation = augmentation

    def forward(self, images: torch.Tensor, *args, **kwargs):
        return self.discriminator(self.augmentation(images), *args, **kwargs)
