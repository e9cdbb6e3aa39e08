"""Training you can watch (issue 27): the run's grids as a labelled animation, its FID curve as fid.png."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli
from helpers import run_here

pytestmark = pytest.mark.tier("e2e")


def test_a_run_ends_with_its_progress_animation_and_fid_curve(tmp_path, capsys):
    """Grids every 2 steps become progress.gif (one labelled frame each); evaluations become fid.png;
    `dist-gan sample RUN --progress --gif=...` writes the same animation on demand."""
    run = tmp_path / "run"
    run_cli(["dist_gan.train", "configs/mnist_dcgan.yaml", f"--run.dir={run}", "--data.source=synthetic",
             "--data.format=memory", "--data.batch_size=8", "--model.generator.width=4",
             "--model.discriminator.width=4", "--train.max_steps=6", "--run.sample_every=2", "--run.log_every=2",
             "--eval.every=2", "--eval.n_samples=32", "--eval.feature_net=helpers:tiny_feature_net",
             "--run.trackers=[]"], env={"PYTHONPATH": str(REPO / "tests")})
    grids = sorted((run / "samples").glob("ema_*.png"))
    assert [g.name for g in grids] == [f"ema_{s:08d}.png" for s in (2, 4, 6)]
    with Image.open(run / "progress.gif") as gif:
        assert gif.n_frames == 3
        frames = []
        for i in range(3):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("L"), dtype=np.int32))
    with Image.open(grids[0]) as grid:
        assert frames[0].shape == (grid.height + 14, grid.width)  # the grid under a label strip
    labels = [f[:14] for f in frames]
    assert all((label < 128).any() for label in labels)  # text drawn on each strip
    assert not np.array_equal(labels[0], labels[2])  # ... and it differs (step 2 vs step 6)
    with Image.open(run / "fid.png") as chart:
        assert chart.size == (480, 300) and len(np.unique(np.asarray(chart.convert("L")))) > 2

    out = tmp_path / "again.gif"
    run_here(["dist_gan.sample", str(run), "--progress", f"--gif={out}"], capsys)
    with Image.open(out) as gif:
        assert gif.n_frames == 3
    empty = tmp_path / "empty"
    (empty / "samples").mkdir(parents=True)
    proc = run_cli(["dist_gan.sample", str(empty), "--progress"], check=False)
    assert proc.returncode == 1 and "holds no sample grids" in proc.stderr and "Traceback" not in proc.stderr
