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
    elif attribute == "_original_forward":  # set by Accelerate's prepare under mixed precision
        target = _bf16_prepared(torch.nn.Linear(3, 2))[1]
    else:
        target = _class(cls)
    assert hasattr(target, attribute), (f"{owner} removed {cls}.{attribute} (used to {why}): "
                                        "dist_gan.backend needs a new way to do it")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate's state is a process-wide singleton: an Accelerator made by an earlier test in this
    process (another precision) would refuse bf16. Start and leave every test with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _bf16_prepared(net):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    return accelerator, accelerator.prepare(net)


def test_plain_takes_off_the_autocast_wrapper_as_unwrap_model_does():
    """backend.plain's own unwrapping (no DeepSpeed import) leaves the network as Accelerate's would:
    its forward runs in fp32 again, and the prepared handle shares it."""
    from dist_gan.backend import plain

    x = torch.randn(4, 3)
    for unwrap in ("ours", "accelerate"):
        accelerator, prepared = _bf16_prepared(torch.nn.Linear(3, 2))
        exact = x @ prepared.weight.T + prepared.bias
        assert not torch.equal(prepared(x), exact)  # computed in bf16 under the wrapper...
        net = plain(accelerator, prepared) if unwrap == "ours" else accelerator.unwrap_model(
            prepared, keep_fp32_wrapper=False)
        assert net is prepared and "_original_forward" not in vars(net)
        assert torch.equal(net(x), exact), unwrap  # ...and in fp32 again


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
