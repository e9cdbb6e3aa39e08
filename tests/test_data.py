import gzip

import numpy as np
import pytest
import torch

from dist_gan.config import DataConfig
from dist_gan.data import DataError, InMemoryBatches, load_mnist_idx, read_idx
from dist_gan.data.sources import mnist_source

pytestmark = pytest.mark.tier("unit")


def test_real_mnist_idx(mnist_dir):
    images, labels = load_mnist_idx(mnist_dir, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and set(labels.tolist()) == set(range(10))
    assert torch.bincount(labels).min() > 5000  # every digit well represented
    test_images, _ = load_mnist_idx(mnist_dir, "test")
    assert test_images.shape == (10000, 28, 28)


def test_uncompressed_and_gzipped_read_the_same(mnist_dir, tmp_path):
    raw = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(raw)
    assert np.array_equal(read_idx(tmp_path / "t10k-labels-idx1-ubyte"),
                          read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz"))


def test_truncated_and_missing_files_name_the_file(mnist_dir, tmp_path):
    raw = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is truncated"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte")
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(DataError, match="junk is not an IDX file"):
        read_idx(tmp_path / "junk")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\] not found in"):
        mnist_source(DataConfig(mnist_dir=str(tmp_path)))


def test_source_resizes_and_repeats_channels(mnist_dir):
    images = mnist_source(DataConfig(mnist_dir=str(mnist_dir), resolution=32, channels=3))
    assert images.images.shape == (60000, 3, 32, 32) and len(images) == 60000
    assert images[0][0].shape == (3, 32, 32) and images[0][1] == 5  # the first MNIST digit is a 5


def test_ranks_get_disjoint_batches_covering_the_epoch():
    images = torch.arange(96, dtype=torch.uint8).view(96, 1, 1, 1)
    labels = torch.arange(96)
    streams = [InMemoryBatches(images, labels, batch_size=8, seed=3, rank=r, world_size=2) for r in (0, 1)]
    seen = []
    for _ in range(streams[0].batches_per_epoch):  # 96 // 16 = 6
        batch = [s.next_batch()[1] for s in streams]
        assert not set(batch[0].tolist()) & set(batch[1].tolist())
        seen += batch[0].tolist() + batch[1].tolist()
    assert sorted(seen) == list(range(96))
    x, _ = streams[0].next_batch()  # next epoch, new order
    assert x.min() >= -1 and x.max() <= 1


def test_stream_position_resumes_exactly():
    images = torch.randint(0, 255, (50, 1, 2, 2), dtype=torch.uint8)
    labels = torch.arange(50)
    a = InMemoryBatches(images, labels, batch_size=4, seed=0)
    for _ in range(17):  # crosses an epoch boundary (12 batches per epoch)
        a.next_batch()
    b = InMemoryBatches(images, labels, batch_size=4, seed=0)
    b.load_state_dict(a.state_dict())
    for _ in range(15):
        assert torch.equal(a.next_batch()[1], b.next_batch()[1])
    c = InMemoryBatches(images, labels, batch_size=4, seed=1)
    assert not torch.equal(InMemoryBatches(images, labels, 4, seed=0).next_batch()[1], c.next_batch()[1])


def test_too_little_data_for_one_global_batch():
    with pytest.raises(DataError, match="cannot fill one global batch"):
        InMemoryBatches(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.zeros(10), 8, 0, 0, 2)
