"""How an epoch of shards is split over ranks and loader workers: pure arithmetic on the manifest's counts.

Every epoch the shards are put in an order drawn from (seed, epoch), the same on every rank, and read
as one sequence of N samples. That sequence is cut into ``readers = world x max(workers, 1)``
contiguous shares of ``N // readers`` samples each; reader ``rank * workers + worker`` reads its share
and nothing else. So every sample is read at most once per epoch whatever the number of shards (a
share may start in the middle of a shard and end in another), fewer than ``readers`` samples are
left out, and every reader, hence every rank, yields the same batches in every epoch.

A share is cut into ``share // batch_size`` batches; the ``share % batch_size`` samples left over are
dealt one by one to the first batches, so a batch holds ``batch_size`` samples or a few more, never
fewer (a batch of 1 would break BatchNorm), and the same number on every rank at every step.

Within a share, samples are shuffled in blocks of ``shuffle_buffer`` (a seeded permutation per
block), so a position in the stream maps to one block and one offset: resuming reads from that
block, skipping tar members before it without decoding them.

Resampled mode draws the shard order with replacement (long enough to cover N samples) instead of a
permutation; the rest is the same.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

from dist_gan.core.seeds import derive
from dist_gan.data.sources import DataError


@dataclass(frozen=True)
class Segment:
    """Samples ``start`` up to ``stop`` (exclusive) of shard number ``shard``, in file order."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


class SplitPlan:
    """The reading plan of every (epoch, rank, worker) for shards of ``counts`` samples."""

    def __init__(self, counts: list[int], world_size: int, workers: int, batch_size: int, seed: int,
                 resampled: bool = False):
        self.counts, self.world_size, self.batch_size = list(counts), world_size, batch_size
        self.workers_per_rank = max(workers, 1)
        self.seed, self.resampled = seed, resampled
        self.readers = world_size * self.workers_per_rank
        self.total = sum(self.counts)
        self.share = self.total // self.readers
        per_reader = self.share // batch_size
        if per_reader < 1:
            needed = self.readers * batch_size
            raise DataError(
                f"the data holds {self.total} samples, too few for one batch of {batch_size} on each of "
                f"{world_size} ranks x {self.workers_per_rank} loader workers: at least {needed} are "
                f"needed (lower data.batch_size or data.workers, use fewer processes, or add data)")
        extra = self.share - per_reader * batch_size
        self.batch_sizes = [batch_size + extra // per_reader + (1 if i < extra % per_reader else 0)
                            for i in range(per_reader)]
        self.batch_starts = list(itertools.accumulate(self.batch_sizes, initial=0))
        self.batches_per_rank = per_reader * self.workers_per_rank
        self._layout_epoch: int | None = None
        self._layout: tuple[list[int], list[int]] = ([], [])

    @property
    def used_fraction(self) -> float:
        """The share of the samples read per epoch."""
        return self.share * self.readers / self.total

    def shard_order(self, epoch: int) -> list[int]:
        """Shard indices in reading order for ``epoch``: a permutation, or (resampled) draws with
        replacement covering at least every reader's share."""
        rng = random.Random(derive(self.seed, "shard_order", epoch))
        if not self.resampled:
            order = list(range(len(self.counts)))
            rng.shuffle(order)
            return order
        order, covered = [], 0
        while covered < self.share * self.readers:
            order.append(rng.randrange(len(self.counts)))
            covered += self.counts[order[-1]]
        return order

    def _epoch_layout(self, epoch: int) -> tuple[list[int], list[int]]:
        """The epoch's shard order and where each shard ends in the epoch's sample sequence
        (kept for the last epoch asked: every reader of an epoch needs the same)."""
        if self._layout_epoch != epoch:
            order = self.shard_order(epoch)
            self._layout = order, list(itertools.accumulate(self.counts[i] for i in order))
            self._layout_epoch = epoch
        return self._layout

    def segments(self, epoch: int, rank: int, worker: int) -> list[Segment]:
        """The pieces of shards that reader (``rank``, ``worker``) reads in ``epoch``, in order."""
        order, ends = self._epoch_layout(epoch)
        begin = (rank * self.workers_per_rank + worker) * self.share
        end = begin + self.share
        found, position = [], bisect.bisect_right(ends, begin)
        while begin < end:
            shard_start = ends[position] - self.counts[order[position]]
            stop = min(end, ends[position])
            if stop > begin:  # an empty shard holds nothing to read
                found.append(Segment(order[position], begin - shard_start, stop - shard_start))
            begin, position = stop, position + 1
        return found

    def reader_of(self, rank_batch: int) -> tuple[int, int]:
        """(worker, that worker's batch index) of batch ``rank_batch`` of a rank's epoch: workers take
        turns, as the DataLoader collects from them."""
        return rank_batch % self.workers_per_rank, rank_batch // self.workers_per_rank

    def first_batch(self, worker: int, rank_batches_done: int) -> int:
        """The batch index ``worker`` continues from once its rank has delivered ``rank_batches_done``."""
        turns, extra = divmod(rank_batches_done, self.workers_per_rank)
        return turns + (1 if worker < extra else 0)
