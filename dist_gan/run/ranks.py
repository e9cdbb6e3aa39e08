"""What the ranks agree on, outside the step: whether any rank wants to stop or skip, and whether
every rank holds the same weights (checksums) or the same value."""

from __future__ import annotations

import torch
import torch.nn as nn
from accelerate import Accelerator


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any: ranks must agree on when to skip or stop."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum") > 0)


def _checksums(module: nn.Module) -> torch.Tensor:
    """(tensors, 4) float64 fingerprints of a module's parameters: the sum, an index-weighted sum
    (catches moved values), and the NaN and inf counts (a NaN compares equal to a NaN here)."""
    rows = []
    for p in module.parameters():
        flat = p.detach().flatten().double()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64) % 1021 + 1
        clean = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
        rows.append(torch.stack([clean.sum(), (clean * weights).sum(), flat.isnan().sum().double(),
                                 flat.isinf().sum().double()]))
    return torch.stack(rows)


@torch.no_grad()
def check_replicas(accelerator: Accelerator, modules: dict[str, nn.Module]) -> dict[str, bool]:
    """Whether every rank holds identical parameters of each module (the DDP invariant), compared
    through per-tensor checksums: one small all-gather whatever the model size.

    Every rank computes its checksums with the same kernels in the same order, so identical weights
    give bit-identical checksums; a one-ulp difference anywhere changes the float64 sums. Buffers
    are left out on purpose: BatchNorm statistics are updated from each rank's own batch and DDP
    re-broadcasts rank 0's before every forward, so rank 0's are the ones used and saved.
    """
    names = list(modules)
    local = torch.cat([_checksums(modules[n]).flatten() for n in names]).to(accelerator.device)
    sizes = [sum(1 for _ in modules[n].parameters()) * 4 for n in names]
    gathered = accelerator.gather(local[None]).view(accelerator.num_processes, -1)
    same = (gathered == gathered[0]).all(0).tolist()
    result, start = {}, 0
    for name, size in zip(names, sizes):
        result[name] = all(same[start:start + size])
        start += size
    return result


def same_on_every_rank(accelerator: Accelerator, value: float) -> bool:
    """Whether every rank holds exactly ``value`` (one small all-gather)."""
    gathered = accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device))
    return bool((gathered == gathered[0]).all())


def agree_on(accelerator: Accelerator, values: dict[str, float | nn.Module]) -> dict[str, bool]:
    """Whether every rank holds the same of each entry: modules through ``check_replicas``, numbers
    exactly (``same_on_every_rank``). A collective; the same answer on every rank."""
    modules = {name: v for name, v in values.items() if isinstance(v, nn.Module)}
    agreed = check_replicas(accelerator, modules) if modules else {}
    agreed.update({name: same_on_every_rank(accelerator, float(v)) for name, v in values.items()
                   if not isinstance(v, nn.Module)})
    return agreed


class ReplicasDiffer(RuntimeError):
    """The ranks' copies of a network or a value differ at a checkpoint (DDP's invariant broke)."""

    @classmethod
    def naming(cls, agreed: dict[str, bool], values: dict, step: int) -> "ReplicasDiffer":
        differ = ", ".join(f"the weights of {name}" if isinstance(values[name], nn.Module) else name
                           for name, same in agreed.items() if not same)
        return cls(f"ranks disagree on {differ} at step {step}: the checkpoint was not written (the "
                   "previous one stays the newest)")
