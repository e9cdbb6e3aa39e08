"""The ``dist-gan`` command (also ``python -m dist_gan``): ``dist-gan train|sample|evaluate ...``."""

from __future__ import annotations

import fire

from dist_gan import evaluate, sample, train


def main() -> None:
    fire.Fire({"train": train.main, "sample": sample.main, "evaluate": evaluate.main})


if __name__ == "__main__":
    main()
