"""Every name a config may use, gathered from where each registry lives.

The registries stay with what they register (``models.GENERATORS``, ``losses.LOSSES``,
``data.DATA_SOURCES``...); this module only collects them for ``config.load_config(..., names=...)``
so that a misspelt name fails at load time, before any process group or network exists. It sits
above the config (which imports nothing of the package) and the registries.
"""

from __future__ import annotations

from collections.abc import Collection

from dist_gan.data import DATA_SOURCES
from dist_gan.losses import LOSSES
from dist_gan.models import DISCRIMINATORS, ENCODERS, GENERATORS


def registered_names() -> dict[str, Collection[str]]:
    """Dotted config key -> the names its registry knows."""
    return {
        "data.source": DATA_SOURCES,
        "loss.name": LOSSES,
        "model.generator.arch": GENERATORS,
        "model.discriminator.arch": DISCRIMINATORS,
        "model.encoder.arch": ["none", *ENCODERS],  # "none": no encoder
    }
