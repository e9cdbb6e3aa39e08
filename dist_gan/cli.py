"""The ``dist-gan`` command (also ``python -m dist_gan``): ``dist-gan train|sample ...``."""

from __future__ import annotations

import fire

from dist_gan import sample, train


def main() -> None:
    fire.Fire({"train": train.main, "sample": sample.main})


if __name__ == "__main__":
    main()
