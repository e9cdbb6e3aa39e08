"""What a run reports: TensorBoard scalars and images, metrics.jsonl, sample PNGs (rank 0 only).

``RunLogger`` is the one place where rank-0-only side effects happen during training: on other ranks
it is built with ``enabled=False`` and every method does nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


class RunLogger:
    def __init__(self, run_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.start = time.time()
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.run_dir))
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def scalars(self, step: int, values: dict[str, float], tb_prefix: str = "train/") -> None:
        """Log ``values`` to TensorBoard (under ``tb_prefix``) and as one line of metrics.jsonl."""
        if not self.enabled:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tb_prefix + name, value, step)
        self.event(step, values)

    def event(self, step: int, values: dict) -> None:
        """One line of metrics.jsonl without TensorBoard (run start, checks, end)."""
        if not self.enabled:
            return
        record = {"step": step, "time_s": round(time.time() - self.start, 3)}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in values.items()})
        self.jsonl.write(json.dumps(record) + "\n")

    def images(self, step: int, tag: str, images: torch.Tensor) -> None:
        """A grid of images in [-1, 1] to TensorBoard and to RUN_DIR/samples/<tag>_<step>.png."""
        if not self.enabled:
            return
        grid = make_grid(images.float().cpu(), nrow=8, normalize=True, value_range=(-1, 1))
        self.writer.add_image(f"samples/{tag}", grid, step)
        save_image(grid, self.run_dir / "samples" / f"{tag}_{step:08d}.png")

    def close(self) -> None:
        """Flush and close; a second call does nothing."""
        if self.enabled and not self.jsonl.closed:
            self.writer.close()
            self.jsonl.close()
