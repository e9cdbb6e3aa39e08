"""The end-of-run progress animation of a 256 px run: wall time and peak memory of
``progress.write_progress`` on 60 sample grids of 8 x 8 images of 256 px (2048 x 2048 each, as
``run.sample_every`` leaves them), in a fresh process per measurement.

    python bench/progress_gif.py [--grids 60] [--out docs/progress_gif.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_run(run: Path, grids: int, size: int = 2048) -> None:
    """``grids`` noisy-but-structured grids (smooth gradients plus noise, compressible like samples)."""
    samples = run / "samples"
    samples.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(grids):
        base = (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.3 + i * 2) % 256
        pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(samples / f"ema_{(i + 1) * 1000:08d}.png")
    (run / "metrics.jsonl").write_text(json.dumps({"step": grids * 1000, "kimg": grids * 64.0}) + "\n")


def measure(run: Path) -> dict:
    """Run write_progress in a child process; its wall time and peak resident memory."""
    code = ("import resource, sys, time; from dist_gan.tools.progress import write_progress; t = time.perf_counter(); "
            f"write_progress({str(run)!r}, {str(run / 'progress.gif')!r}); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    seconds, peak_kb = out.stdout.split()
    with Image.open(run / "progress.gif") as gif:
        frames, width = gif.n_frames, gif.width
    return {"seconds": round(float(seconds), 1), "peak_rss_mb": round(int(peak_kb) / 1024),
            "frames": frames, "frame_width": width,
            "gif_mb": round((run / "progress.gif").stat().st_size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, default=60)
    parser.add_argument("--out", help="also write the result (markdown) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        make_run(run, args.grids)
        result = measure(run)
    line = (f"| {args.grids} grids of 2048 x 2048 | {result['frames']} frames, {result['frame_width']} px wide | "
            f"{result['seconds']} s | {result['peak_rss_mb']} MB | {result['gif_mb']} MB |")
    table = ("| input | animation | wall time | peak memory (process) | file |\n|---|---|---|---|---|\n" + line)
    print(table)
    if args.out:
        Path(args.out).write_text(
            "# The progress animation of a 256 px run\n\n"
            "`write_run_pictures` ends every run with `progress.gif`. Measured by "
            f"`python bench/progress_gif.py --out docs/progress_gif.md` on {time.strftime('%Y-%m-%d')} "
            "(2-core CPU machine): at most 48 grids (evenly spaced, first and last kept), each shrunk to "
            "1024 px wide, read one at a time from disk (Pillow keeps only each frame's palette image).\n"
            "Before (main `b16df9d`): every full-size frame in memory, 60 grids took 4 min 49 s and 2.3 GB "
            "(issue 31).\n\n" + table + "\n")


if __name__ == "__main__":
    main()
