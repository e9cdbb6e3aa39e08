"""``python -m dist_gan.data prepare|verify``: write WebDataset shards from a dataset, check them.

  python -m dist_gan.data prepare --source=mnist --mnist_dir=DIR --out=data/mnist --shard_size=10000
  python -m dist_gan.data prepare --source=mnist --mnist_dir=DIR --out=data/mnist8 --shards_multiple_of=16
  python -m dist_gan.data prepare --source=mnist --mnist_dir=DIR --out=data/mnist2k --limit=2000
  python -m dist_gan.data prepare --source=mnist --mnist_dir=DIR --out=data/mnist_png --encoding=png
  python -m dist_gan.data prepare --source=cifar10 --root=DIR --out=data/cifar10 --resolution=32 --channels=3
  python -m dist_gan.data prepare --source=folder --root=DIR --out=data/faces --resolution=64 --channels=3 [--strict]
  python -m dist_gan.data verify 'data/mnist/train-{000000..000005}.tar'
"""

from __future__ import annotations

import logging
import sys

import fire

from dist_gan.config import ConfigError, load_config
from dist_gan.data import DATA_SOURCES, DataError, prepare_shards
from dist_gan.data.shards import verify_shards
from dist_gan.data.sources import NATURAL_SIZE


def prepare(source: str, out: str, split: str = "train", shard_size: int = 10000,
            resolution: int | None = None, channels: int | None = None, mnist_dir: str | None = None,
            root: str = "data", strict: bool = False, shards_multiple_of: int = 1, limit: int = 0,
            encoding: str = "auto") -> None:
    """Write ``source`` (mnist, cifar10, folder) as shards plus manifest.json into ``out``.

    ``--shards_multiple_of=M`` writes a multiple of M shards (one size, the last shorter) of at most
    ``shard_size`` (M = GPUs x loader workers gives every reader whole shards; any count works, this
    only saves seeks).

    ``--limit=N`` writes a fixed seeded subset of N training images (limited-data experiments).

    ``--encoding=raw|png|jpg`` says how images are stored: raw uint8 bytes need no decoding (the
    loader's CPU goes to training instead), png is lossless and smaller, jpg (quality 95) smallest and
    lossy. The default, auto, is raw up to 64x64 RGB and png above.

    Existing shards in ``out`` are replaced only once every image has been read. Unreadable images
    are skipped and counted; ``--strict`` stops at the first one instead.
    """
    natural = NATURAL_SIZE.get(source, (64, 3))
    overrides = {"source": source, "mnist_dir": mnist_dir, "root": root, "shard_size": shard_size,
                 "resolution": resolution or natural[0], "channels": channels or natural[1], "strict": strict,
                 "limit": limit, "encoding": encoding, "format": "memory"}  # format: data.limit is checked against it
    try:
        cfg = load_config(None, {f"data.{k}": v for k, v in overrides.items()},
                          {"data.source": DATA_SOURCES}).data
        if not isinstance(shards_multiple_of, int) or shards_multiple_of < 1:
            raise DataError(f"--shards_multiple_of={shards_multiple_of!r} must be a whole number >= 1")
        prepare_shards(cfg, out, split, shards_multiple_of=shards_multiple_of)
    except (ConfigError, DataError) as err:
        sys.exit(f"dist_gan.data prepare: error: {err}")


def verify(shards: str, manifest: str | None = None) -> None:
    """Check every local shard of the pattern ``shards`` against its manifest (sha256, sample count)."""
    try:
        bad = verify_shards(shards, manifest)
    except DataError as err:
        sys.exit(f"dist_gan.data verify: error: {err}")
    if bad:
        sys.exit("dist_gan.data verify: shards that disagree with their manifest:\n  " + "\n  ".join(bad))
    logging.getLogger(__name__).info("all shards of %s match their manifest", shards)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    fire.Fire({"prepare": prepare, "verify": verify})


if __name__ == "__main__":
    main()
