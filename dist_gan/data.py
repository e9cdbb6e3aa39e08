"""Training data: sources that load images, and the batch stream the loop draws from.

The loop sees only ``BatchStream``: ``next_batch()`` returns images in [-1, 1] (N, C, H, W) and labels,
and ``state_dict()`` / ``load_state_dict()`` carry the stream's position through a checkpoint, so a
resumed run reads exactly the batches the uninterrupted run would have read. A new source is one
function ``(DataConfig) -> (uint8 images N,C,H,W, int64 labels)`` plus one line in ``DATA_SOURCES``.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dist_gan.config import DataConfig

log = logging.getLogger(__name__)

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """Training data is missing or malformed; the message names the file."""


class BatchStream(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array, checking its header against its size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or padded: header says {shape}, "
                        f"{expected} bytes expected, {len(raw)} found")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_mnist_file(directory: str | Path, stem: str) -> Path:
    directory = Path(directory)
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"MNIST file {stem}[.gz] not found in {directory} "
                    f"(data.mnist_dir must hold the four IDX files: {sorted(MNIST_FILES.values())})")


def load_mnist_idx(directory: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` ("train" or "test") from IDX files: uint8 (N, 28, 28) and int64 labels."""
    images = read_idx(find_mnist_file(directory, MNIST_FILES[f"{split}_images"]))
    labels = read_idx(find_mnist_file(directory, MNIST_FILES[f"{split}_labels"]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"MNIST {split} files in {directory} disagree: images {images.shape}, "
                        f"labels {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def mnist_source(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST train split from ``cfg.mnist_dir``, or downloaded by torchvision into ``cfg.root``."""
    if cfg.mnist_dir:
        images, labels = load_mnist_idx(cfg.mnist_dir, "train")
    else:
        from torchvision.datasets import MNIST

        dataset = MNIST(cfg.root, train=True, download=True)
        images, labels = dataset.data, dataset.targets.long()
    return fit_images(images.unsqueeze(1), cfg.resolution, cfg.channels), labels


def fit_images(images: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to ``resolution`` and repeat grey to ``channels``."""
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        resized = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear",
                                antialias=True, align_corners=False)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    if images.shape[1] != channels:
        if images.shape[1] != 1:
            raise DataError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
        images = images.expand(-1, channels, -1, -1).contiguous()
    return images


DATA_SOURCES: dict[str, Callable[[DataConfig], tuple[torch.Tensor, torch.Tensor]]] = {
    "mnist": mnist_source,
}


class InMemoryBatches:
    """Batches from a dataset held in memory, in a seeded order, split across ranks.

    Each epoch is a permutation drawn from ``seed + epoch``, identical on every rank; rank r takes its
    slice of each global batch, so ranks never see the same sample in one step and every rank gets the
    same number of batches (the last incomplete global batch is dropped). The position is two integers.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = torch.device(device)
        self.batches_per_epoch = len(images) // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise DataError(f"{len(images)} images cannot fill one global batch of "
                            f"{batch_size} x {world_size} processes (data.batch_size)")
        self.epoch, self.batch = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.images), generator=generator)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = (self.batch * self.world_size + self.rank) * self.batch_size
        index = self._order[start : start + self.batch_size]
        self.batch += 1
        images = self.images[index].to(self.device, non_blocking=True)
        labels = self.labels[index].to(self.device, non_blocking=True)
        return images.float().div_(127.5).sub_(1.0), labels

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._order = self._permutation(self.epoch)


def build_batch_stream(cfg: DataConfig, seed: int, rank: int, world_size: int,
                       device: torch.device | str) -> InMemoryBatches:
    """Load ``cfg.source`` and wrap it in a stream of this rank's batches."""
    images, labels = DATA_SOURCES[cfg.source](cfg)
    log.info("data: %s, %d images %s", cfg.source, len(images), tuple(images.shape[1:]))
    return InMemoryBatches(images, labels, cfg.batch_size, seed, rank, world_size, device)
