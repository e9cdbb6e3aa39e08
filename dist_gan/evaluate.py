"""``python -m dist_gan.evaluate RUN_DIR_OR_CHECKPOINT --n=10000 [--json_out=PATH]``: quality figures.

Prints FID, KID, classifier Inception Score, precision, recall and class coverage of the checkpoint's
generator (EMA weights unless --raw) against real MNIST train, beside the same figures for real test
data against real train (the floor a perfect generator would reach with this many samples).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import fire

from dist_gan.config import ConfigError
from dist_gan.data.sources import DataError

COLUMNS = ["fid", "kid", "is", "precision", "recall", "classes_covered", "min_class_share"]


def format_table(results: dict) -> str:
    rows = [name for name in results if not name.startswith("_")]
    width = max(len(r) for r in rows)
    lines = [" " * width + "".join(f"{c:>17}" for c in COLUMNS)]
    for row in rows:
        lines.append(f"{row:<{width}}" + "".join(f"{results[row][c]:>17.4f}" for c in COLUMNS))
    return "\n".join(lines)


def main(checkpoint: str, n: int = 10000, json_out: str | None = None, raw: bool = False, seed: int = 0,
         mnist_dir: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from dist_gan.metrics import evaluate_checkpoint

    try:
        results = evaluate_checkpoint(checkpoint, n, ema=not raw, seed=seed, mnist_dir=mnist_dir)
    except (ConfigError, DataError, FileNotFoundError) as err:
        sys.exit(f"dist_gan.evaluate: error: {err}")
    print(f"{results['_source']['checkpoint']} ({'raw' if raw else 'EMA'} weights, n={n})")
    print(format_table(results))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
