"""The epoch split over ranks and loader workers, at world sizes up to 512 and any shard layout.

The plan is arithmetic on the manifest's counts, so it is simulated here for every rank and worker
of large worlds; tests/test_shards.py and tests/test_world_sizes.py check real readers follow it.
"""

from __future__ import annotations

import pytest

from dist_gan.data import DataError
from dist_gan.data.split import SplitPlan

pytestmark = pytest.mark.tier("unit")

WORLDS = [1, 2, 3, 4, 6, 8, 16, 64, 512]
WORKERS = [0, 1, 2, 4]
BATCH = 16


def layouts(total: int) -> dict[str, list[int]]:
    """Shard sample counts adding up to about ``total``, in the shapes data comes in."""
    sixth = total // 6
    many = 3000
    return {
        "one shard": [total],
        "three shards": [total // 3] * 3,  # fewer shards than ranks for worlds above 3
        "six equal": [sixth] * 6,
        "short last": [sixth] * 5 + [max(1, sixth // 7)],
        "thousands small": [total // many + (1 if i < total % many else 0) for i in range(many)],
    }


def check_epoch(plan: SplitPlan, epoch: int) -> int:
    """Assert the epoch's properties; return the number of samples read."""
    pieces, read = [], 0
    for rank in range(plan.world_size):
        rank_batches = 0
        for worker in range(plan.workers_per_rank):
            segments = plan.segments(epoch, rank, worker)
            length = sum(len(s) for s in segments)
            assert length == plan.share  # every reader reads exactly its share
            assert all(0 <= s.start < s.stop <= plan.counts[s.shard] for s in segments)
            pieces += [(s.shard, s.start, s.stop) for s in segments]
            rank_batches += len(plan.batch_sizes)
            read += length
        assert rank_batches == plan.batches_per_rank  # the same number of batches on every rank
    pieces.sort()
    for (shard_a, _, stop_a), (shard_b, start_b, _) in zip(pieces, pieces[1:]):
        assert shard_a != shard_b or stop_a <= start_b  # no sample read twice in the epoch
    return read


@pytest.mark.parametrize("world", WORLDS)
def test_every_world_size_and_layout_reads_each_sample_at_most_once_and_nearly_all(world):
    for workers in WORKERS:
        readers = world * max(workers, 1)
        for ratio in (4, 9):  # at least world x workers x batch x 4 samples, and more
            for name, counts in layouts(readers * BATCH * ratio + 7 * readers // 3 + 5).items():
                total = sum(counts)
                plan = SplitPlan(counts, world, workers, BATCH, seed=3)
                assert min(plan.batch_sizes) >= BATCH  # never a smaller (or size-1) batch
                assert sum(plan.batch_sizes) == plan.share
                orders = set()
                for epoch in range(3):
                    read = check_epoch(plan, epoch)
                    if total >= readers * BATCH * 4:
                        assert read / total >= 0.98, (name, world, workers, read, total)
                    orders.add(tuple(plan.shard_order(epoch)))
                assert len(counts) == 1 or len(orders) > 1  # a new shard order each epoch


@pytest.mark.parametrize("world,workers", [(8, 2), (512, 4), (3, 0)])
def test_too_little_data_says_how_much_is_needed(world, workers):
    readers = world * max(workers, 1)
    with pytest.raises(DataError, match=rf"holds {readers * BATCH - 1} samples.* at least "
                                        rf"{readers * BATCH} are needed \(lower data.batch_size"):
        SplitPlan([readers * BATCH - 1], world, workers, BATCH, seed=0)
    SplitPlan([readers * BATCH], world, workers, BATCH, seed=0)  # exactly enough is fine


def test_leftover_samples_enlarge_the_first_batches_never_shrink_one():
    plan = SplitPlan([100], 1, 0, 16, seed=0)  # 100 = 6 x 16 + 4
    assert plan.batch_sizes == [17, 17, 17, 17, 16, 16] and plan.used_fraction == 1.0


def test_resampled_order_covers_the_epoch_and_is_seeded():
    counts = [5, 50, 500, 7]
    plan = SplitPlan(counts, 4, 2, 8, seed=1, resampled=True)
    for epoch in range(3):
        assert sum(len(s) for r in range(4) for w in range(2) for s in plan.segments(epoch, r, w)) \
            == plan.share * 8
    assert plan.shard_order(5) == SplitPlan(counts, 4, 2, 8, seed=1, resampled=True).shard_order(5)


def test_batches_are_dealt_to_workers_in_turn_and_resume_anywhere():
    plan = SplitPlan([1000], 2, 3, 10, seed=0)
    per_reader = len(plan.batch_sizes)
    for done in range(plan.batches_per_rank + 1):
        delivered = [sum(1 for b in range(done) if plan.reader_of(b)[0] == w) for w in range(3)]
        assert [plan.first_batch(w, done) for w in range(3)] == delivered
        assert all(d <= per_reader for d in delivered)
