"""What a run reports: metrics.jsonl, sample PNGs, and Accelerate's trackers (rank 0 only).

``RunLogger`` is the one place where rank-0-only side effects happen during training: on other ranks
it is built with ``enabled=False`` and every method does nothing. Scalars, sample grids and the config
go to every tracker named in ``run.trackers`` (Accelerate's: tensorboard, wandb, mlflow, aim,
comet_ml, clearml, dvclive, swanlab, trackio), ``metrics.jsonl`` always.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from pathlib import Path

import torch

from dist_gan.config import ConfigError
from dist_gan.core.imagegrid import picture, save_grid_png
from dist_gan.core.private_api import private_api

log = logging.getLogger(__name__)

# tracker -> (module to import, what to pip install)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "mlflow": ("mlflow", "mlflow"), "aim": ("aim", "aim"),
                    "comet_ml": ("comet_ml", "comet-ml"), "clearml": ("clearml", "clearml"),
                    "dvclive": ("dvclive", "dvclive"), "swanlab": ("swanlab", "swanlab"),
                    "trackio": ("trackio", "trackio")}


# What each tracker needs besides its package, for the error when it cannot start
TRACKER_SETUP = {"mlflow": "set MLFLOW_TRACKING_URI, e.g. file:./mlruns or http://HOST:5000",
                 "wandb": "wandb login, or WANDB_MODE=offline", "comet_ml": "set COMET_API_KEY",
                 "clearml": "clearml-init", "aim": "aim init"}


def check_installed(names: list[str]) -> None:
    """A tracker whose package is missing is a one-line error (on every rank, so none waits)."""
    for name in names:
        module, pip_name = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"run.trackers names {name}, whose package is not installed: "
                              f"pip install {pip_name} (or drop it from run.trackers)")


def start_trackers(names: list[str], run_dir: Path) -> list:
    """Accelerate's tracker objects for ``names``, started, the run named after its directory
    (TensorBoard writes into the run directory itself)."""
    import accelerate.tracking

    classes = private_api(accelerate.tracking, "LOGGER_TYPE_TO_CLASS")
    trackers = []
    for name in names:
        cls = classes[name]
        try:
            if cls.requires_logging_directory:
                tracker = cls(run_dir.name, run_dir.parent)
            else:
                tracker = cls(run_dir.name)
            tracker.start()
        except Exception as err:  # each service raises its own types (no URI, no login, offline)
            raise ConfigError(f"run.trackers: {name} could not start ({_first_line(err)}); configure it "
                              f"({TRACKER_SETUP.get(name, 'see its documentation')}) or drop it from "
                              "run.trackers") from None
        trackers.append(tracker)
    return trackers


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def flat(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """``{"optim": {"g_lr": ...}}`` -> ``{"optim.g_lr": ...}`` with values every tracker accepts."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return out


class RunLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, trackers: list[str] | tuple[str, ...] = ("tensorboard",),
                 config: dict | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.start = time.time()
        check_installed(list(trackers))
        if not enabled:
            return
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.trackers = start_trackers(list(trackers), self.run_dir)
        for tracker in self.trackers:
            try:
                tracker.store_init_configuration(flat(config or {}))
            except Exception as err:
                raise ConfigError(f"run.trackers: {tracker.name} could not record the config "
                                  f"({_first_line(err)}); configure it or drop it from run.trackers") from None
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def scalars(self, step: int, values: dict[str, float], tb_prefix: str = "train/") -> None:
        """Log ``values`` to every tracker (under ``tb_prefix``) and as one line of metrics.jsonl."""
        if not self.enabled:
            return
        numbers = {tb_prefix + name: value for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)
        self.event(step, values)

    def event(self, step: int, values: dict) -> None:
        """One line of metrics.jsonl, for no tracker (run start, checks, end)."""
        if not self.enabled:
            return
        record = {"step": step, "time_s": round(time.time() - self.start, 3)}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in values.items()})
        self.jsonl.write(json.dumps(record) + "\n")

    def images(self, step: int, tag: str, images: torch.Tensor, extent: float | None = None) -> None:
        """A grid of images in [-1, 1] (2-D points: their scatter plot over [-extent, extent]^2) to
        RUN_DIR/samples/<tag>_<step>.png and every tracker that takes images (TensorBoard, W&B, Aim,
        ClearML, SwanLab; MLflow as an image artifact)."""
        if not self.enabled:
            return
        grid = picture(images, nrow=8, extent=extent)
        save_grid_png(grid, self.run_dir / "samples" / f"{tag}_{step:08d}.png")
        pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({f"samples/{tag}": grid[None]}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_image(pixels, key=f"samples_{tag}", step=step)
            elif hasattr(tracker, "log_images"):
                tracker.log_images({f"samples/{tag}": [pixels]}, step=step)

    def close(self) -> None:
        """Finish the trackers and close metrics.jsonl; a second call does nothing.

        A tracker that cannot flush (a full disk, a lost server) is reported and the others still
        close: this runs on the way out of a run, often with the error that stopped it in flight,
        and must not replace that error's one line with its own traceback."""
        if self.enabled and not self.jsonl.closed:
            for tracker in self.trackers:
                try:
                    tracker.finish()
                except Exception as err:  # noqa: BLE001 - any tracker, any failure: report, go on
                    log.warning("could not finish the %s tracker (its last values may be lost): %s",
                                tracker.name, err)
            try:
                self.jsonl.close()
            except OSError as err:
                log.warning("could not close %s (its last lines may be lost): %s", self.jsonl.name, err)
