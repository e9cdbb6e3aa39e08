"""``python -m dist_gan.export RUN_OR_CHECKPOINT --out DIR``: the generator as a standalone model
folder (what it holds: ``dist_gan.tools.export``)."""

from __future__ import annotations

import logging
import sys

from dist_gan.config import ConfigError
from dist_gan.data import DataError
from dist_gan.tools.export import export, upload_to_hub


def main(checkpoint: str, out: str, raw: bool = False, push_to_hub: str | None = None,
         overwrite: bool = False, onnx: bool = False) -> None:
    """Export ``checkpoint`` (a run directory or a checkpoint) to the folder ``out``.

    --raw: the trained weights instead of their EMA. --push_to_hub=USER/REPO: upload it too.
    --onnx: also write generator.onnx (inputs z, labels if conditional, truncation for stylegan2).
    --overwrite: replace an export already in ``out`` (otherwise a non-empty ``out`` is refused).
    """
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        folder = export(checkpoint, out, ema=not raw, overwrite=overwrite, onnx=onnx)
        if push_to_hub:
            upload_to_hub(folder, push_to_hub)
    except (ConfigError, DataError, FileNotFoundError) as err:
        sys.exit(f"dist_gan.export: error: {err}")


if __name__ == "__main__":
    from dist_gan.core.cliargs import run_command

    run_command(main, "dist_gan.export")
