"""The run's state with one owner: every stateful part of a run registers here under the name of its
entry in a checkpoint's ``trainer_state.pt``, and saving, restoring, agreeing over ranks, checking
replicas and logging are one loop each over what is registered.

A part implements ``state_dict()`` / ``load_state_dict(state)`` (a part without them takes part in
the hooks only), and any of these optional hooks:

* ``agree(mean_over_ranks)``: per-rank state made the same on every rank (log and save steps);
* ``replica_values() -> {name: float | nn.Module}``: what must be identical on every rank when a
  checkpoint is written (floats compared exactly, modules through checksums);
* ``log_values(window, images) -> {name: float}``: entries of the log line, given the window's
  means and the real images D saw in it (ADA's p moves on them);
* ``after_step(step)``: after every step, on the device, without a host sync (the EMA's update);
* ``weights() -> [nn.Module]``: networks whose weights must all be finite for a checkpoint to be a
  rollback target.

A part registered ``per_rank`` (each rank's data position) is saved once per rank and gathered on
rank 0; when a resume runs on another world size it is re-derived by the part's ``for_world``.
The networks, optimisers, grad scalers and RNG states are saved by Accelerate beside this state.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from dist_gan.config import ConfigError

STEP, WORLD_SIZE, RANKS = "step", "world_size", "ranks"
# The averaged generator's weights: what sampling and export read from a checkpoint.
EMA = "ema"
# The per-rank part every run registers (its position in the data stream).
DATA = "data"


class RunStateError(ConfigError):
    """A saved run state lacks an entry this run needs; the message names it."""


class RunState:
    """The registry: parts by name, in the order they load (a later part may rely on an earlier)."""

    def __init__(self) -> None:
        self.parts: dict[str, Any] = {}
        self.per_rank: dict[str, Any] = {}
        self.optional: set[str] = set()

    def register(self, name: str, part: Any, *, per_rank: bool = False, optional: bool = False) -> None:
        """Add ``part`` under ``name``; ``optional``: a saved state without this entry (written
        before the part kept state) leaves the part as built."""
        if name in self.parts or name in self.per_rank or name in (STEP, WORLD_SIZE, RANKS):
            raise ValueError(f"run state entry {name!r} is registered twice or reserved")
        (self.per_rank if per_rank else self.parts)[name] = part
        if optional:
            self.optional.add(name)

    def _saved(self) -> dict[str, Any]:
        return {name: part for name, part in self.parts.items() if hasattr(part, "state_dict")}

    def _hooks(self, hook: str) -> list[Callable]:
        parts = [*self.parts.values(), *self.per_rank.values()]
        return [getattr(part, hook) for part in parts if hasattr(part, hook)]

    def state_dict(self, step: int, world_size: int, gather: Callable[[list], list]) -> dict:
        """The whole state at ``step``; ``gather`` collects a one-item list from every rank (a
        collective: every rank calls this)."""
        state: dict[str, Any] = {STEP: step, WORLD_SIZE: world_size}
        state.update({name: part.state_dict() for name, part in self._saved().items()})
        state[RANKS] = gather([{name: part.state_dict() for name, part in self.per_rank.items()}])
        return state

    def load_state_dict(self, state: dict, rank: int, world_size: int) -> int:
        """Restore every part from ``state``; return its step. An entry saved as None (the part was
        off in the saved run, e.g. no EMA) leaves the part as built."""
        state = _upgrade(state)
        for name, part in self._saved().items():
            if name not in state:
                if name in self.optional:
                    continue
                raise RunStateError(f"the saved run state has no {name!r} entry (it has "
                                    f"{', '.join(sorted(state))})")
            if state[name] is not None:
                part.load_state_dict(state[name])
        saved_world, ranks = int(state[WORLD_SIZE]), state[RANKS]
        for name, part in self.per_rank.items():
            saved = [entry[name] for entry in ranks]
            part.load_state_dict(saved[rank] if saved_world == world_size else
                                 part.for_world(saved, world_size))
        return int(state[STEP])

    def agree(self, mean_over_ranks: Callable) -> None:
        for agree in self._hooks("agree"):
            agree(mean_over_ranks)

    def replica_values(self) -> dict[str, float | nn.Module]:
        values: dict[str, float | nn.Module] = {}
        for hook in self._hooks("replica_values"):
            values.update(hook())
        return values

    def log_values(self, window: dict[str, float], images: int) -> dict[str, float]:
        values: dict[str, float] = {}
        for hook in self._hooks("log_values"):
            values.update(hook(window, images))
        return values

    def after_step(self, step: int) -> None:
        for hook in self._hooks("after_step"):
            hook(step)

    def weights(self) -> list[nn.Module]:
        return [module for hook in self._hooks("weights") for module in hook()]


def _upgrade(state: dict) -> dict:
    """A state saved before the registry (format 1): ``ranks`` held bare data positions."""
    ranks = state.get(RANKS, [])
    if ranks and DATA not in ranks[0]:
        state = {**state, RANKS: [{DATA: entry} for entry in ranks]}
    return state


def ema_weights(state: dict) -> dict | None:
    """The EMA generator's weights in a saved run state, or None (the run had no EMA)."""
    return state.get(EMA)


class DataPosition:
    """A rank's position in its batch stream, as a per-rank part."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    @staticmethod
    def for_world(saved: list[dict], world_size: int) -> dict:
        """Rank 0's epoch and the same share of it consumed (batches x old world / new world): the
        order of the rest of that epoch differs from an uninterrupted run, which cannot be helped
        when ranks split the data differently."""
        first = saved[0]
        return {"epoch": int(first["epoch"]), "batch": int(first["batch"]) * len(saved) // world_size}
