"""``dist-gan evaluate``: quality figures of a checkpoint, or the reference statistics of a data set.

    dist-gan evaluate RUN_DIR_OR_CHECKPOINT --n=10000 [--json_out=PATH] [--reference_stats=stats.npz]
    dist-gan evaluate --reference=DATA --out=stats.npz [--split=train] [--feature_net=inception]

The first prints FID, KID, Inception Score, precision, recall (and, for a classifier of the data's
classes, class coverage) of the checkpoint's generator (EMA weights unless --raw) in the run's
feature space (eval.feature_net), against the real training data, beside the same figures for real
test data against real train (the floor a perfect generator would reach with this many samples).

The second embeds a data set once and writes its mean, covariance, count and a seeded subset of its
features to an .npz (mu and sigma as pytorch-fid names them), for ``eval.reference_stats``. DATA is
a folder of images (give --resolution), a data source name (mnist, cifar10; with --mnist_dir or
--root) or a config YAML (its data section).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dist_gan.config import MIN_EVAL_SAMPLES, ConfigError, load_config
from dist_gan.core.fsutil import write_json_atomically
from dist_gan.data.sources import NATURAL_SIZE, DataError

COLUMNS = ["fid", "kid", "is", "precision", "recall", "classes_covered", "min_class_share", "modes", "modes_kl",
           "mode_hit_share"]


def format_table(results: dict) -> str:
    rows = [name for name in results if not name.startswith("_")]
    columns = [c for c in COLUMNS if any(c in results[r] for r in rows)]
    width = max(len(r) for r in rows)
    lines = [" " * width + "".join(f"{c:>17}" for c in columns)]
    for row in rows:
        lines.append(f"{row:<{width}}" + "".join(f"{results[row][c]:>17.4f}" for c in columns))
    return "\n".join(lines)


def reference_config(reference: str, resolution: int | None, channels: int | None, mnist_dir: str | None,
                     root: str | None, feature_net: str, feature_weights: str | None, limit: int,
                     batch_size: int):
    """The config that describes ``reference`` (a folder, a source name or a config file) and how
    to embed it; returns (config, a description for the file's metadata)."""
    from dist_gan.run.registry import registered_names

    path = Path(reference)
    overrides: dict = {"eval.feature_net": feature_net, "eval.batch_size": batch_size, "data.format": "memory"}
    if reference.endswith((".yaml", ".yml")) and path.is_file():
        base, description = path, f"config {reference}"
    elif path.is_dir():
        if resolution is None:
            raise ConfigError(f"--reference={reference} is a folder: give --resolution (the size the "
                              "generator makes) and --channels (3 unless grey)")
        base, description = None, f"folder {path.resolve()}"
        overrides.update({"data.source": "folder", "data.root": str(path), "data.channels": channels or 3})
    elif reference in NATURAL_SIZE:
        base, description = None, f"{reference}"
        natural = NATURAL_SIZE[reference]
        overrides.update({"data.source": reference, "data.resolution": resolution or natural[0],
                          "data.channels": channels or natural[1]})
    else:
        raise ConfigError(f"--reference={reference}: not a folder, a config .yaml or one of "
                          f"{sorted(NATURAL_SIZE)}")
    for key, value in (("data.resolution", resolution), ("data.channels", channels),
                       ("data.mnist_dir", mnist_dir), ("data.root", root),
                       ("eval.feature_weights", feature_weights), ("data.limit", limit or None)):
        if value is not None:
            overrides[key] = value
    return load_config(base, overrides, registered_names()), description


SPLITS = ("train", "test")  # what every data source holds (a folder is one set: train and test alike)


def main(checkpoint: str | None = None, n: int | None = None, json_out: str | None = None, raw: bool = False,
         seed: int = 0, mnist_dir: str | None = None, reference: str | None = None, out: str | None = None,
         split: str = "train", resolution: int | None = None, channels: int | None = None,
         root: str | None = None, feature_net: str = "auto", feature_weights: str | None = None,
         reference_stats: str | None = None, limit: int = 0, batch_size: int = 100) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from dist_gan.metrics import write_reference
    from dist_gan.tools.evaluation import evaluate_checkpoint

    try:
        if split not in SPLITS:
            raise ConfigError(f"--split={split!r} must be one of {list(SPLITS)}")
        if reference is not None:
            if not out:
                raise ConfigError("--reference needs --out=FILE.npz (where the statistics go)")
            config, description = reference_config(reference, resolution, channels, mnist_dir, root,
                                                   feature_net, feature_weights, limit, batch_size)
            stats = write_reference(config, split, out, f"{description} ({split})")
            print(f"{out}: {stats.count} images of {description} ({split}), {len(stats.mean)}-d "
                  f"{stats.meta['feature_net']} features")
            return
        if checkpoint is None:
            raise ConfigError("give a run directory or checkpoint to evaluate, or --reference=DATA --out=FILE")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < MIN_EVAL_SAMPLES):
            raise ConfigError(f"--n={n!r} must be a whole number >= {MIN_EVAL_SAMPLES} (training's eval.n_samples "
                              "minimum; FID needs thousands to mean much: 10000 is the default, the mode-"
                              "coverage protocols' count for StackedMNIST and the 2-D mixtures)")
        if json_out and Path(json_out).is_dir():
            raise ConfigError(f"--json_out={json_out} is a directory: name a file")
        results = evaluate_checkpoint(checkpoint, n, ema=not raw, seed=seed, mnist_dir=mnist_dir,
                                      reference_stats=reference_stats, feature_weights=feature_weights,
                                      feature_net=feature_net)
    except (ConfigError, DataError, FileNotFoundError) as err:
        sys.exit(f"dist_gan.evaluate: error: {err}")
    print(f"{results['_source']['checkpoint']} ({'raw' if raw else 'EMA'} weights, n={results['_source']['n']}, "
          f"{results['_source']['feature_net']} features)")
    print(format_table(results))
    if json_out:
        try:
            write_json_atomically(Path(json_out), results)  # a reader never sees half a file
        except OSError as err:
            sys.exit(f"dist_gan.evaluate: error: cannot write --json_out={json_out}: {err.strerror or err}")


if __name__ == "__main__":
    from dist_gan.core.cliargs import run_command

    run_command(main, "dist_gan.evaluate")
