"""Every random stream of a run, derived from the run seed in one place.

A stream is named by its purpose and the integers that tell its copies apart (rank, epoch, worker,
step, rollback). ``derive`` feeds them to numpy's ``SeedSequence``, whose output for distinct inputs
is independent (no ``seed + rank`` style collisions between, say, rank 1 of epoch 0 and rank 0 of
epoch 1). The purposes:

  weights          the networks' initial weights: the same on every rank
  noise            each rank's training noise (z, labels, penalty interpolation), by rank
  noise/resume     the same after an elastic resume (another world size), by rank and step
  noise/rollback   the same after a divergence rollback, by rank and rollback count
  eval             each rank's evaluation latents, by rank
  shard_order      the epoch's shard order (the same on every rank), by epoch
  shard_shuffle    a loader worker's shuffle buffer, by epoch, rank and worker
  loader           the DataLoader's worker base seed, by epoch
  memory_order     the in-memory stream's permutation, by epoch
  xflip            (``mirrored``) which epochs show a sample mirrored, by the sample's name
"""

from __future__ import annotations

import zlib

import numpy as np


def derive(seed: int, purpose: str, *keys: int) -> int:
    """A 32-bit seed (what numpy and Accelerate's ``set_seed`` take) for stream ``purpose`` of run
    seed ``seed`` and ``keys``."""
    entropy = [int(seed) & 0xFFFFFFFF, zlib.crc32(purpose.encode()), *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


def mirrored(seed: int, sample: str, epoch: int) -> bool:
    """Whether ``data.xflip`` shows ``sample`` (a name unique in the data set) mirrored in ``epoch``:
    alternate epochs, starting with a parity drawn from the seed and the name. Any two consecutive
    epochs show every image both ways, the doubled data set of StyleGAN2-ADA's --mirror."""
    return (zlib.crc32(f"{int(seed)}/xflip/{sample}".encode()) + int(epoch)) % 2 == 1
