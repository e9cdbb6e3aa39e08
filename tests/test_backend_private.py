"""Private APIs behind one door each (issue 25): every private attribute dist_gan uses exists in the
installed torch and Accelerate, and a missing one is an error naming it."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from dist_gan.backend import PRIVATE_APIS, private_api


def _class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("owner,cls,attribute,why", PRIVATE_APIS, ids=[p[2] for p in PRIVATE_APIS])
def test_every_private_attribute_we_use_still_exists(owner, cls, attribute, why):
    if attribute == "_last_lr":  # an instance attribute: look on a real scheduler
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        target = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    else:
        target = _class(cls)
    assert hasattr(target, attribute), (f"{owner} removed {cls}.{attribute} (used to {why}): "
                                        "dist_gan.backend needs a new way to do it")


def test_a_missing_private_attribute_is_an_error_naming_it():
    with pytest.raises(RuntimeError, match=r"has no attribute _get_scale_async, which dist_gan uses to read "
                                           r"the fp16 loss scale"):
        private_api(object(), "_get_scale_async")


def test_no_private_attribute_is_used_outside_the_door():
    """Each private name appears in dist_gan only inside backend.py."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "dist_gan"
    names = [p[2] for p in PRIVATE_APIS]
    offenders = [f"{path.name}: {name}" for path in package.rglob("*.py") if path.name != "backend.py"
                 for name in names if re.search(rf"\.{name}\b", path.read_text())]
    assert offenders == []
