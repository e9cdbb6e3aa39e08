"""``python -m dist_gan.train CONFIG.yaml [--section.key=value ...]`` (also under ``accelerate launch``)."""

from __future__ import annotations

import logging
import os
import sys

import fire

from dist_gan.run.launch import OUTPUT_ENV, STATUS_DIR_ENV
from dist_gan.run.stop import PREEMPTED_EXIT_CODE, StopRequest


def setup_logging() -> None:
    """INFO on the main process, warnings only elsewhere, so N ranks do not print N copies."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Accelerate logs every file of every checkpoint at INFO.
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def _write_to_launcher_terminal() -> None:
    """Under ``dist-gan launch``: write to its terminal directly, not through the launcher."""
    paths = os.environ.get(OUTPUT_ENV)
    if not paths:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in zip((1, 2), paths.split(",")):
        try:
            target = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            return  # not on Linux, or the command is gone: keep the launcher's pipe
        os.dup2(target, fd)
        os.close(target)


def _record_status(code: int) -> None:
    """Under ``dist-gan launch``: this rank's exit status, for the command's own."""
    directory = os.environ.get(STATUS_DIR_ENV)
    if directory:
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(directory, f"rank{rank}.status"), "w") as f:
            f.write(str(code))


def _record_pid() -> None:
    """Under ``dist-gan launch``: this rank's pid, once it catches the stop signals (the command
    sends SIGUSR1 to the ranks themselves)."""
    directory = os.environ.get(STATUS_DIR_ENV)
    if directory:
        path = os.path.join(directory, f"rank{os.environ.get('RANK', '0')}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)


def _peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank went away."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "NCCL communicator was aborted", "socket closed"))


def main(config: str | None = None, *stray: str, debug: bool = False, **overrides) -> None:
    """Train from the YAML file ``config`` (none: the defaults); any ``--section.key=value`` overrides
    a config value, e.g. ``dist-gan train --data.folder=DIR --data.resolution=64 --data.channels=3``.

    Exit status: 0 done; 1 an error (one line on stderr; --debug for the traceback); 75 stopped by
    SIGUSR1/SIGTERM after saving a checkpoint, also when the signal came during start-up (resume
    with --train.resume=auto).
    """
    code = 1
    if stray or not isinstance(debug, bool):
        extra = list(stray) + ([] if isinstance(debug, bool) else [debug])
        _record_status(code)
        sys.exit(f"dist_gan.train: error: unexpected argument(s) {extra} after the config {config!r}: "
                 "give one CONFIG.yaml, then --section.key=value overrides (and --debug for tracebacks)")
    try:
        _write_to_launcher_terminal()
        _train(config, debug, **overrides)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if code != PREEMPTED_EXIT_CODE:
            raise
    finally:
        _record_status(code)
    _leave(code)


def _leave(code: int) -> None:
    """End a run that finished (0) or saved and stopped (75) with ``code``.

    A rank of a multi-process run leaves without the interpreter's teardown (after flushing what it
    wrote): everything the run owns is closed by then, and in about one multi-process run in a few
    hundred on 2 busy cores, a rank died in torch's C++ teardown after a complete run (SIGABRT,
    "terminate called without an active exception"), which the launcher reports as a failed job.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def _train(config: str | None = None, debug: bool = False, **overrides) -> None:
    """The body of ``main`` (signals caught, errors as one line)."""
    # The stop signals are caught from here on; the slow imports (torch, accelerate) come after.
    with StopRequest() as stop_request:
        _record_pid()
        setup_logging()
        from dist_gan.config import ConfigError, load_config
        from dist_gan.data import DataError
        from dist_gan.run.loop import TrainingDiverged, train
        from dist_gan.run.registry import registered_names

        rank = int(os.environ.get("RANK", "0"))
        try:
            result = train(load_config(config, overrides, registered_names()), stop_request)
        except (ConfigError, DataError, FileNotFoundError, TrainingDiverged) as err:
            if debug:
                raise
            sys.exit(f"dist_gan.train: error: {err}")
        except Exception as err:
            if debug or not _peer_failure(err):
                raise
            # another rank stopped (its own one-line error says why, or it was killed): no gloo/NCCL
            # traceback on top
            who = "another rank" if rank == 0 else "rank 0 or another rank"
            sys.exit(f"dist_gan.train: error: rank {rank}: {who} stopped or was killed (its own message "
                     f"says why, if it had time to write one); this rank's collective failed with it "
                     f"({type(err).__name__})")
    if result.preempted:  # checkpoint saved; tell the scheduler to requeue
        sys.exit(PREEMPTED_EXIT_CODE)
    if result.main_process:  # a pre-empted run has no time to spare for these
        from dist_gan.tools.progress import write_run_pictures

        write_run_pictures(result.run_dir)


if __name__ == "__main__":
    fire.Fire(main)
