"""imagegrid writes the pixels torchvision's save_image wrote (without importing torchvision)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from dist_gan.core.imagegrid import save_png

pytestmark = pytest.mark.tier("unit")


@pytest.mark.parametrize("count,channels,nrow", [(1, 1, 8), (1, 3, 8), (64, 1, 8), (10, 3, 4), (7, 1, 3)])
def test_pngs_are_pixel_for_pixel_torchvisions(tmp_path, count, channels, nrow):
    images = torch.randn(count, channels, 9, 7, generator=torch.Generator().manual_seed(count)) * 1.3
    save_png(images, tmp_path / "ours.png", nrow=nrow)
    save_image(images, tmp_path / "torchvision.png", nrow=nrow, normalize=True, value_range=(-1, 1))
    ours, theirs = Image.open(tmp_path / "ours.png"), Image.open(tmp_path / "torchvision.png")
    assert ours.mode == theirs.mode and ours.size == theirs.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.tier("cluster")
def test_training_code_does_not_import_torchvision_or_deepspeed():
    """About 2 s of every training process's start; they are imported only where used."""
    code = ("import sys; import dist_gan.run.loop, dist_gan.sample, dist_gan.export, dist_gan.run.tracking; "
            "print(sorted(m for m in ('torchvision', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
