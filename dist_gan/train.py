"""``python -m dist_gan.train CONFIG.yaml [--section.key=value ...]`` (also under ``accelerate launch``)."""

from __future__ import annotations

import logging
import os
import sys

import fire

from dist_gan.stop import PREEMPTED_EXIT_CODE, StopRequest


def setup_logging() -> None:
    """INFO on the main process, warnings only elsewhere, so N ranks do not print N copies."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Accelerate logs every file of every checkpoint at INFO.
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def main(config: str | None = None, debug: bool = False, **overrides) -> None:
    """Train from the YAML file ``config`` (none: the defaults); any ``--section.key=value`` overrides
    a config value, e.g. ``dist-gan train --data.folder=DIR --data.resolution=64 --data.channels=3``.

    Exit status: 0 done; 1 an error (one line on stderr; --debug for the traceback); 75 stopped by
    SIGUSR1/SIGTERM after saving a checkpoint, also when the signal came during start-up (resume
    with --train.resume=auto).
    """
    # The stop signals are caught from here on; the slow imports (torch, accelerate) come after.
    with StopRequest() as stop_request:
        setup_logging()
        from dist_gan.config import ConfigError, load_config
        from dist_gan.data import DataError
        from dist_gan.loop import TrainingDiverged, train
        from dist_gan.registry import registered_names

        try:
            result = train(load_config(config, overrides, registered_names()), stop_request)
        except (ConfigError, DataError, FileNotFoundError, TrainingDiverged) as err:
            if debug:
                raise
            sys.exit(f"dist_gan.train: error: {err}")
    if result.preempted:  # checkpoint saved; tell the scheduler to requeue
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    fire.Fire(main)
