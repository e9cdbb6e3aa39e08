"""A batch stream over a dataset held in memory (small sets, tests, benchmarks without decoding)."""

from __future__ import annotations

import torch

from dist_gan.core.seeds import derive, mirrored
from dist_gan.data.sources import DataError, ImageSet, check_labels, to_model_range


class InMemoryBatches:
    """Batches from uint8 images in memory, in a seeded order, split across ranks.

    Each epoch is a permutation drawn from ``seed`` and the epoch, identical on every rank; rank r
    takes its slice of each global batch, so ranks never see the same sample in one step and every rank
    gets the same number of batches (the last incomplete global batch is dropped). The position is
    two integers. ``xflip``: each image mirrored in alternate epochs (``seeds.mirrored``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 num_classes: int = 0, xflip: bool = False):
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.xflip = xflip
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = torch.device(device)
        self.batches_per_epoch = len(images) // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise DataError(f"{len(images)} images cannot fill one global batch of "
                            f"{batch_size} x {world_size} processes (data.batch_size)")
        self.epoch, self.batch = 0, 0
        self._order = self._permutation(0)
        self._mirror = self._mirrored(0)

    @classmethod
    def from_image_set(cls, images: ImageSet, **kwargs) -> "InMemoryBatches":
        pairs = [images[i] for i in range(len(images))]
        return cls(torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]), **kwargs)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive(self.seed, "memory_order", epoch))
        return torch.randperm(len(self.images), generator=generator)

    def _mirrored(self, epoch: int) -> torch.Tensor | None:
        """Which images ``epoch`` shows mirrored (None: no flips)."""
        if not self.xflip:
            return None
        return torch.tensor([mirrored(self.seed, str(i), epoch) for i in range(len(self.images))])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
            self._mirror = self._mirrored(self.epoch)
        start = (self.batch * self.world_size + self.rank) * self.batch_size
        index = self._order[start : start + self.batch_size]
        self.batch += 1
        check_labels(self.labels[index], self.num_classes)
        images = self.images[index]
        if self._mirror is not None:
            images = torch.where(self._mirror[index].view(-1, 1, 1, 1), images.flip(-1), images)
        images = images.to(self.device, non_blocking=True)
        labels = self.labels[index].to(self.device, non_blocking=True)
        return to_model_range(images), labels

    def counters(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def close(self) -> None:
        """Nothing to release: no worker processes."""

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batch = min(int(state["batch"]), self.batches_per_epoch)  # see ShardStream
        self._order = self._permutation(self.epoch)
        self._mirror = self._mirrored(self.epoch)
