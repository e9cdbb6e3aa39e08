"""Streaming WebDataset shards to the loop: seeded, split by rank and worker, resumable, fault-tolerant.

Epoch mode: each epoch the shard list is shuffled from (seed, epoch), identically on every rank; rank r
takes every world-th shard and its worker w every workers-th of those, so every sample is read exactly
once per epoch. Samples pass a shuffle buffer seeded from (seed, epoch, rank, worker). From the
manifest's counts every rank computes the same per-epoch batch budget (the smallest rank's number of
full batches), so all ranks step through epochs together and DDP never waits on a rank that ran dry.
Resampled mode draws shards with replacement from a seeded generator instead (for very large sets).

The loader is not passed through ``accelerator.prepare`` (that would dispatch from rank 0 or have every
rank read everything); batches are moved to the device here. Position = (epoch, batches into it);
resuming re-reads and discards that many batches of the epoch, which reproduces the stream exactly.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import random
import signal
import threading
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_gan.data.sources import DataError, to_model_range
from dist_gan.seeds import derive

log = logging.getLogger(__name__)
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
MAX_WARNINGS_PER_WORKER = 5


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave the stop signals to the main process.

    A scheduler signals every process of a job step; a worker killed by SIGTERM makes the main
    process fail at its next batch ("DataLoader worker is killed by signal") before it can
    checkpoint. So SIGUSR1 is ignored, and SIGTERM is taken by a thread that waits for it: sent by
    the parent (multiprocessing terminating its children at exit) it ends the worker as before;
    from anyone else it is dropped, and the worker serves until the main process has saved and shuts
    the loader down (or dies: torch's watchdog then ends the worker).
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()


def _exit_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def worker_error(err: DataError) -> DataError:
    """The one-line DataError a loader worker raised, without the worker traceback that the
    DataLoader pastes into the message when it re-raises it in the main process."""
    text = str(err)
    if "Original Traceback" not in text:
        return err
    last = [line for line in text.splitlines() if line.strip()][-1]
    return DataError(last.split(": ", 1)[1] if ": " in last else last)


class BadSample(ValueError):
    pass


def decode_sample(sample: dict, resolution: int, channels: int) -> tuple[torch.Tensor, int]:
    """One WebDataset sample -> (uint8 C x H x W, label); BadSample says what is wrong with it."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample(f"no image ({'/'.join(IMAGE_KEYS)}) among {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        with Image.open(io.BytesIO(sample[key])) as image:
            image.load()
            mode, size = image.mode, image.size
            array = np.asarray(image, dtype=np.uint8)
    except Exception as err:  # PIL raises many types for corrupt data
        raise BadSample(f"undecodable {key}: {err}") from err
    expected = "L" if channels == 1 else "RGB"
    if mode != expected or size != (resolution, resolution):
        raise BadSample(f"{mode} {size[0]}x{size[1]} image, expected {expected} {resolution}x{resolution}")
    try:
        label = int(sample["cls"]) if "cls" in sample else -1
    except ValueError as err:
        raise BadSample(f"label {sample['cls']!r} is not an integer") from err
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy()), label


class ShardSamples(IterableDataset):
    """Decoded (image, label) samples of this rank's shards for the current ``epoch``.

    ``bad_counts`` ([bad samples, unreadable shards]) is shared memory that the DataLoader's worker
    processes inherit, so what they skip is counted exactly, wherever in the stream it happens.
    """

    def __init__(self, shards: list[tuple[str, int]], rank: int, world_size: int, seed: int,
                 resolution: int, channels: int, shuffle_buffer: int, resampled: bool, strict: bool):
        self.shards, self.rank, self.world_size, self.seed = shards, rank, world_size, seed
        self.resolution, self.channels = resolution, channels
        self.shuffle_buffer, self.resampled, self.strict = shuffle_buffer, resampled, strict
        self.epoch = 0
        self.bad_counts = multiprocessing.Array("q", 2)

    def _count(self, index: int) -> None:
        with self.bad_counts.get_lock():
            self.bad_counts[index] += 1

    def plan(self, epoch: int, rank: int, worker: int, workers: int) -> list[int]:
        """Indices of the shards that (rank, worker) reads in ``epoch`` (epoch mode)."""
        order = list(range(len(self.shards)))
        random.Random(derive(self.seed, "shard_order", epoch)).shuffle(order)
        return order[rank :: self.world_size][worker::workers]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(derive(self.seed, "shard_shuffle", self.epoch, self.rank, worker))
        if self.resampled:
            chosen = (self.shards[rng.randrange(len(self.shards))] for _ in iter(int, 1))
        else:
            chosen = (self.shards[i] for i in self.plan(self.epoch, self.rank, worker, workers))
        samples = self._decoded(chosen)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return samples

    def _decoded(self, shards: Iterator[tuple[str, int]]) -> Iterator[tuple[torch.Tensor, int]]:
        """Decoded samples of ``shards`` ((url, manifest count) pairs), bad ones skipped and counted.

        A shard read to its end holding another number of samples than its manifest entry is
        reported by name (an error under ``strict``): a wrong manifest would otherwise surface only
        as an epoch that ends early.
        """
        warned = 0

        def warn(message: str) -> None:
            nonlocal warned
            if warned < MAX_WARNINGS_PER_WORKER:
                warned += 1
                log.warning(message)

        for url, expected in shards:
            unreadable = False

            def on_error(exn: Exception, url: str = url) -> bool:
                nonlocal unreadable
                unreadable = True
                if self.strict:
                    raise DataError(f"shard {url} is unreadable: {exn.args[0] if exn.args else exn}")
                self._count(1)
                warn(f"skipping the rest of unreadable shard {url}: {exn.args[0] if exn.args else exn}")
                return True

            found = 0
            for sample in wds.tarfile_samples([{"url": url}], handler=on_error):
                found += 1
                try:
                    image, label = decode_sample(sample, self.resolution, self.channels)
                except BadSample as bad:
                    message = f"sample {sample.get('__key__')!r} of shard {url}: {bad}"
                    if self.strict:
                        raise DataError(message + " (data.strict=true)") from None
                    self._count(0)
                    warn(f"skipping {message}")
                    continue
                yield image, label
            if not unreadable and found != expected:
                message = (f"shard {url} holds {found} samples but its manifest entry says {expected}: "
                           "re-run prepare, or `python -m dist_gan.data verify` the shards")
                if self.strict:
                    raise DataError(message + " (data.strict=true)")
                warn(message)


class ShardStream:
    """The loop's ``BatchStream`` over shards: a DataLoader per epoch, batches moved to ``device``."""

    def __init__(self, dataset: ShardSamples, batch_size: int, workers: int,
                 device: torch.device | str = "cpu", pin_memory: bool | None = None,
                 prefetch_factor: int = 4):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.budget = self.batches_per_epoch()
        if self.budget < 1:
            raise DataError(f"the shards cannot fill one batch of {batch_size} per rank and worker "
                            f"({dataset.world_size} ranks x {max(workers, 1)} workers over "
                            f"{len(dataset.shards)} shards): lower data.batch_size or data.workers")
        self.epoch, self.batch = 0, 0
        self._batches: Iterator | None = None

    def batches_per_epoch(self) -> int:
        """Full batches every rank can deliver per epoch: the minimum over ranks, known from counts."""
        ds, workers = self.dataset, max(self.workers, 1)
        if ds.resampled:
            return sum(c for _, c in ds.shards) // (self.batch_size * ds.world_size)
        return min(
            sum(sum(ds.shards[i][1] for i in ds.plan(0, rank, w, workers)) // self.batch_size
                for w in range(workers))
            for rank in range(ds.world_size)
        )

    def _open_epoch(self) -> None:
        self.dataset.epoch = self.epoch
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG each
        # time an iterator opens, which would shift the training noise after a resume.
        seed = torch.Generator().manual_seed(derive(self.dataset.seed, "loader", self.epoch))
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                            drop_last=True, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.workers > 0 else None,
                            generator=seed, worker_init_fn=ignore_stop_signals)
        self._batches = iter(loader)

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._batches)
        except DataError as err:
            raise worker_error(err) from None

    def _next_raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:  # first call, or after load_state_dict: replay to the position
            self._open_epoch()
            for _ in range(self.batch):
                self._read()
        if self.batch == self.budget:
            self.epoch, self.batch = self.epoch + 1, 0
            self._open_epoch()
        try:
            return self._read()
        except StopIteration:
            if self.batch == 0:
                raise DataError(f"epoch {self.epoch} produced no batch: every shard of this rank "
                                "failed to read (see the warnings above)") from None
            log.warning("rank %d ran out of samples in epoch %d after %d of %d batches (bad samples "
                        "skipped, or shards shorter than their manifest entries: see the warnings "
                        "above); starting epoch %d early", self.dataset.rank, self.epoch,
                        self.batch, self.budget, self.epoch + 1)
            self.epoch, self.batch = self.epoch + 1, 0
            self._open_epoch()
            return self._read()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._next_raw()
        self.batch += 1
        images = to_model_range(images.to(self.device, non_blocking=True))
        return images, labels.to(self.device, non_blocking=True)

    def counters(self) -> dict[str, int]:
        """Bad samples and unreadable shards met by this rank's readers so far (including read-ahead)."""
        skipped, bad_shards = self.dataset.bad_counts[:]
        return {"data_skipped_samples": skipped, "data_bad_shards": bad_shards}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def close(self) -> None:
        """Stop the loader workers now (dropping the iterator shuts them down through the
        DataLoader's own protocol) rather than whenever the iterator is collected."""
        self._batches = None

    def load_state_dict(self, state: dict) -> None:
        # min(): a position re-derived for another world size may lie past this rank's epoch end
        self.epoch, self.batch = int(state["epoch"]), min(int(state["batch"]), self.budget)
        self._batches = None
