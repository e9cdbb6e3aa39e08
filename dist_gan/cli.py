"""The ``dist-gan`` command (also ``python -m dist_gan``): ``dist-gan train|sample|evaluate ...``."""

from __future__ import annotations

import sys
from typing import Callable

import fire

USAGE = """usage: dist-gan COMMAND [ARGS]

  train CONFIG.yaml [--section.key=value ...]   train (see README: Train)
  launch [ACCELERATE OPTIONS] CONFIG.yaml [...]   train under accelerate launch, with the run's exit status
  sample RUN_OR_CHECKPOINT [--n=64 --out=...]     write samples from a trained generator
  evaluate RUN_OR_CHECKPOINT [...]                FID / KID / IS of a checkpoint
  evaluate --reference DATA --out stats.npz       reference statistics of a data set
  export RUN_OR_CHECKPOINT --out=DIR              the generator as model.safetensors + config.json

`dist-gan COMMAND --help` shows a command's options."""


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(USAGE)  # status 1: a script that forgot the command must not pass
    if sys.argv[1] == "launch":  # accelerate launch's options are not ours to check
        from dist_gan.run.launch import main as launch

        sys.exit(launch(sys.argv[2:]))
    from dist_gan import evaluate, export, sample, train
    from dist_gan.core.cliargs import run_command

    commands: dict[str, Callable[..., None]] = {"train": train.main, "sample": sample.main,
                                                "evaluate": evaluate.main, "export": export.main}
    if sys.argv[1] in commands:
        run_command(commands[sys.argv[1]], f"dist-gan {sys.argv[1]}", sys.argv[2:])
    else:
        fire.Fire(commands)


if __name__ == "__main__":
    main()
