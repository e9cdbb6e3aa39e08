"""Streaming WebDataset shards to the loop: seeded, split by rank and worker, resumable by seeking.

What each (epoch, rank, worker) reads is decided by ``dist_gan.data.split.SplitPlan`` from the
manifest's counts alone: a contiguous share of the epoch's shuffled shard sequence, cut into batches,
the same number on every rank in every epoch, whatever the number of shards. A reader (one per
DataLoader worker) reads its share's tar members in order, shuffles them in seeded blocks, decodes
only what it yields and hands the DataLoader whole batches.

Resuming at (epoch, batch) seeks: each reader starts at the block holding its next batch. With the
sample offsets the manifest records, a local shard is opened there by a seek and an ``http(s)://`` one
by a ``Range`` request, so the cost does not grow with the position; ``pipe:`` URLs (and manifests
written before offsets were recorded) skip the members before it by their headers (nothing is
decoded), at most one shard's headers.

A bad sample is replaced within its batch by a good one of the same batch, and a batch with no good
sample by the next readable batch of the share, so positions, batch counts and resume stay exact with
damaged data; what was skipped is counted and warned about (``strict``: an error).

The loader is not passed through ``accelerator.prepare`` (that would dispatch from rank 0 or have every
rank read everything); batches are moved to the device here.
"""

from __future__ import annotations

import bisect
import contextlib
import http.client
import io
import itertools
import logging
import multiprocessing
import os
import random
import select
import signal
import subprocess
import tarfile
import threading
import urllib.request
from typing import Any, Iterator, cast

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_gan.core.seeds import derive, mirrored
from dist_gan.data.shards import ShardEntry, local_path, member_key, shard_name
from dist_gan.data.sources import DataError, check_labels, to_model_range
from dist_gan.data.split import SplitPlan

log = logging.getLogger(__name__)
IMAGE_KEYS = ("u8", "png", "jpg", "jpeg", "webp")  # u8: raw uint8 C x H x W bytes
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


# What the readers count, as indices into ShardReader.bad_counts, and their names in the log.
SKIPPED_SAMPLE, BAD_SHARD = 0, 1
BAD_COUNTS = ("data_skipped_samples", "data_bad_shards")


class BadSample(ValueError):
    pass


def decode_sample(sample: dict, resolution: int, channels: int) -> tuple[torch.Tensor, int]:
    """One WebDataset sample -> (uint8 C x H x W, label); BadSample says what is wrong with it."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        keys = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(f"no image ({'/'.join(IMAGE_KEYS)}) among {keys}")
    if key == "u8":
        return _raw_image(sample[key], resolution, channels), _label(sample)
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
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy()), _label(sample)


def _raw_image(payload: bytes, resolution: int, channels: int) -> torch.Tensor:
    """Raw uint8 bytes -> C x H x W: the shape is the data set's (manifest, config), so only the length
    can be checked."""
    expected = channels * resolution * resolution
    if len(payload) != expected:
        raise BadSample(f"raw image of {len(payload)} bytes, expected {expected} ({channels} x "
                        f"{resolution} x {resolution})")
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(channels, resolution, resolution)


def _label(sample: dict) -> int:
    try:
        return int(sample["cls"]) if "cls" in sample else -1
    except ValueError as err:
        raise BadSample(f"label {sample['cls']!r} is not an integer") from err


RawSample = dict  # tar members of one key: {"__key__": ..., "u8" or "png": bytes, "cls": bytes}


HTTP_TIMEOUT_S = 60  # default data.read_timeout_s: a source silent this long fails the read (counted, named)
# What reading a shard over the network can raise besides OSError (a body cut off mid-transfer, a
# connection dropped between requests): the shard is unreadable from there on.
READ_ERRORS = (tarfile.TarError, OSError, EOFError, http.client.HTTPException)


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular files (7: contiguous, read as regular)


class TarReader:
    """The members of a tar archive, read one after another from ``stream``'s position on.

    A small reader of the ustar format (with PAX and GNU long names, as tarfile writes them): the
    loader needs only each member's name and, for the samples it keeps, its bytes, and tarfile's
    general header parsing costs most of the loader's CPU (docs/data_throughput.md). Headers are
    checksummed; a bad header or data that ends inside a member raise ``tarfile.ReadError``, as
    tarfile does.
    """

    def __init__(self, stream, seekable: bool):
        self.stream, self.seekable = stream, seekable
        self.pending = self.size = 0  # the current member's padded data not yet consumed; its size

    def _read(self, count: int) -> bytes:
        data = self.stream.read(count)
        while len(data) < count:  # sockets and pipes may return less than asked
            more = self.stream.read(count - len(data))
            if not more:
                raise tarfile.ReadError(f"unexpected end of data ({len(data)} of {count} bytes)")
            data += more
        return data

    def _skip(self) -> None:
        if self.pending and self.seekable:
            self.stream.seek(self.pending, os.SEEK_CUR)
        else:
            while self.pending:
                self.pending -= len(self._read(min(self.pending, 1 << 20)))
        self.pending = 0

    def members(self) -> Iterator[str]:
        """Each regular file member's name; ``data()`` then returns its bytes (else it is skipped)."""
        long_name = None
        while True:
            self._skip()
            header = self.stream.read(_BLOCK)
            if len(header) < _BLOCK and header:
                header += self.stream.read(_BLOCK - len(header))
            if not header or header == _ZERO_BLOCK:
                return  # the end of the archive (or of a stream cut between members)
            if len(header) < _BLOCK:
                raise tarfile.ReadError("unexpected end of data in a tar header")
            name, size, kind = _parse_header(header)
            padded = -(-size // _BLOCK) * _BLOCK
            if kind in (b"x", b"L"):  # the next member's long name (PAX "path" record or GNU)
                extra = self._read(padded)[:size]
                long_name = _pax_path(extra) if kind == b"x" else extra.rstrip(b"\0").decode("utf-8", "replace")
                continue
            self.pending, self.size = padded, size
            if kind in _FILE_TYPES:
                yield long_name or name
            long_name = None

    def data(self) -> bytes:
        data = self._read(self.pending)[: self.size]
        self.pending = 0
        return data


def _parse_header(header: bytes) -> tuple[str, int, bytes]:
    """(name, data size, type flag) of a 512-byte tar header; ReadError if it is not one."""
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError("not a tar header (its checksum field is not a number)") from None
    if stored != sum(header) - sum(header[148:156]) + 8 * 32:
        raise tarfile.ReadError("bad checksum in a tar header")
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        size = int.from_bytes(field[1:], "big")
    else:
        size = int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345]:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace"), size, header[156:157]


def _pax_path(records: bytes) -> str | None:
    """The ``path`` of a PAX extended header ("<length> <key>=<value>\\n" records), if it has one."""
    for line in records.split(b"\n"):
        _, _, record = line.partition(b" ")
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
    return None


@contextlib.contextmanager
def _open_tar(url: str, offset: int = 0, timeout: float = HTTP_TIMEOUT_S) -> Iterator[TarReader]:
    """Shard ``url`` opened at byte ``offset`` (a sample's first header; 0: the start).

    A local file is opened for seeking (headers are read, data skipped by seek); an ``http(s)://``
    URL is requested from ``offset`` with a ``Range`` header (a server that ignores it sends the whole
    shard, and the bytes before ``offset`` are read and dropped); anything else (``pipe:``, ``s3://``)
    streams from the start through WebDataset's ``gopen``, and the caller skips by headers.
    """
    path = local_path(url)
    if path is not None:
        with open(path, "rb") as handle:
            handle.seek(offset)
            yield TarReader(handle, seekable=True)
        return
    if url.startswith(("http://", "https://")):
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = _WholeBody(response)
            if offset and response.status != 206:
                _drop(body, offset)
            yield TarReader(body, seekable=False)
        return
    if url.startswith("pipe:"):
        with _PipeStream(url[len("pipe:"):], timeout) as stream:
            yield TarReader(stream, seekable=False)
        return
    stream = wds.gopen(url)
    try:
        yield TarReader(stream, seekable=False)
    finally:
        # a command's failure surfaces while reading (gopen checks its exit status); one stopped
        # early because the reader had what it needed must not turn into an error here
        with contextlib.suppress(OSError):
            stream.close()


class _PipeStream:
    """The output of a ``pipe:`` shard command, read with a timeout: a command that sends nothing
    for ``timeout`` seconds fails the read (``TimeoutError``, an OSError: counted like a cut-off
    shard, the command named), and one that exits non-zero fails it at the end of its output.
    Closed early (the reader had what it needed), the command is stopped, which is no error."""

    def __init__(self, command: str, timeout: float):
        self.command, self.timeout = command, timeout
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        self.stdout = self.proc.stdout
        self.fd = self.stdout.fileno()

    def read(self, size: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"pipe command {self.command!r} sent nothing for {self.timeout:g} s "
                               "(data.read_timeout_s)")
        data = os.read(self.fd, size)
        if not data:
            status = self.proc.wait()
            if status != 0:
                raise OSError(f"pipe command {self.command!r} exited with status {status}")
        return data

    def __enter__(self) -> "_PipeStream":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.stdout.close()
        self.proc.wait()


class _WholeBody:
    """An HTTP response body that raises when the connection ends before the length the server
    announced (``http.client`` returns the short body as if it were whole, and a tar cut between
    members would read as a shorter shard)."""

    def __init__(self, response: http.client.HTTPResponse):
        self.response, self.received = response, 0
        length = response.headers.get("Content-Length")
        self.expected = int(length) if length is not None else None

    def read(self, size: int) -> bytes:
        data = self.response.read(size)
        self.received += len(data)
        if not data and self.expected is not None and self.received < self.expected:
            raise EOFError(f"the transfer was cut off: {self.received} of {self.expected} bytes arrived")
        return data


def _drop(stream, count: int) -> None:
    """Read and discard ``count`` bytes of ``stream`` (a server that answered a Range request whole)."""
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise EOFError(f"the shard ended {count} bytes before the requested offset")
        count -= len(chunk)


def seekable(url: str) -> bool:
    """Whether a reader can start ``url`` at a byte offset (local files, HTTP) rather than skip there."""
    return local_path(url) is not None or url.startswith(("http://", "https://"))


def tar_samples(url: str, start: int, stop: int, scan_rest: bool, seen: list[int],
                offsets: list[int] | None = None, timeout: float = HTTP_TIMEOUT_S) -> Iterator[RawSample]:
    """Samples ``start`` to ``stop`` of shard ``url`` in file order, their bytes not decoded.

    With the shard's sample ``offsets`` (from the manifest) a seekable shard is opened at sample
    ``start``'s first header; otherwise the ``start`` samples before are passed over by their headers.
    When ``stop`` is the shard's end (``scan_rest``) the rest is scanned too (headers), so ``seen[0]``
    ends as the number of samples the shard holds, for the manifest check.
    """
    jump = start if offsets and 0 < start < len(offsets) and seekable(url) else 0
    with _open_tar(url, offsets[jump] if offsets and jump else 0, timeout) as tar:
        index, current = jump - 1, cast(dict[str, Any] | None, None)
        for name in tar.members():
            key, extension = member_key(name)
            if current is None or key != current["__key__"]:
                if current is not None and start <= index < stop:
                    yield current
                index += 1
                seen[0] = index + 1
                if index >= stop and not scan_rest:
                    return
                current = {"__key__": key, "__url__": url}
            if start <= index < stop:
                current[extension] = tar.data()
        if current is not None and start <= index < stop:
            yield current


class ShardReader(IterableDataset):
    """Whole batches of this rank's readers for ``epoch``, from ``start_batch`` of the rank's epoch on.

    The DataLoader collects from its workers in turn beginning with worker 0, and the rank's batch
    ``b`` comes from reader ``b % workers``; so after ``start_batch`` batches worker ``i`` plays reader
    ``(i + start_batch) % workers`` and the order continues exactly as if never interrupted.
    ``bad_counts`` ([bad samples, unreadable shards]) is shared memory that the workers inherit.
    """

    def __init__(self, shards: list[ShardEntry], plan: SplitPlan, rank: int, resolution: int,
                 channels: int, shuffle_buffer: int, strict: bool, xflip: bool = False,
                 read_timeout: float = HTTP_TIMEOUT_S):
        self.urls, self.xflip, self.read_timeout = [shard.url for shard in shards], xflip, read_timeout
        self.offsets = [shard.offsets for shard in shards]
        self.plan, self.rank = plan, rank
        self.resolution, self.channels = resolution, channels
        self.block, self.strict = max(shuffle_buffer, 1), strict
        self.epoch, self.start_batch = 0, 0
        self.bad_counts = multiprocessing.Array("q", len(BAD_COUNTS))
        self._warned = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        readers = self.plan.workers_per_rank
        reader = ((info.id if info else 0) + self.start_batch) % readers
        first = self.plan.first_batch(reader, self.start_batch)
        return _Share(self, reader).batches(first)

    def count(self, what: int) -> None:
        """Add one to ``bad_counts[what]`` (SKIPPED_SAMPLE or BAD_SHARD), from any worker."""
        with self.bad_counts.get_lock():
            self.bad_counts[what] += 1

    def warn(self, message: str) -> None:
        if self._warned < MAX_WARNINGS_PER_WORKER:
            self._warned += 1
            log.warning(message)


class _Share:
    """One reader's share of an epoch: raw samples by position, shuffled in blocks, decoded in batches."""

    def __init__(self, owner: ShardReader, reader: int):
        self.owner, self.reader = owner, reader
        plan = owner.plan
        self.segments = plan.segments(owner.epoch, owner.rank, reader)
        self.segment_starts = list(itertools.accumulate((len(s) for s in self.segments), initial=0))
        self.batch_starts = plan.batch_starts

    def batches(self, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cursor = _Cursor(self, first, count=True)
        for batch in range(first, len(self.batch_starts) - 1):
            good = self.decoded(cursor.take(batch), count=True)
            yield _collate(good or self.substitute(batch), self.batch_starts[batch + 1] - self.batch_starts[batch])

    def substitute(self, batch: int) -> list[tuple[torch.Tensor, int]]:
        """The samples of the next batch of the share with a readable sample (wrapping around), for
        a batch with none: keeps every rank's batch count, and a resumed run, exact."""
        batches = len(self.batch_starts) - 1
        for other in [*range(batch + 1, batches), *range(batch)]:
            good = self.decoded(_Cursor(self, other, count=False).take(other), count=False)
            if good:
                return good
        names = sorted({shard_name(self.owner.urls[s.shard]) for s in self.segments})
        raise DataError(f"no readable sample in rank {self.owner.rank}'s share of epoch "
                        f"{self.owner.epoch} (shards {', '.join(names)}): see the warnings above")

    def decoded(self, raw: list[RawSample | None], count: bool) -> list[tuple[torch.Tensor, int]]:
        owner, good = self.owner, []
        for sample in raw:
            if sample is None:  # lost with an unreadable shard: already reported
                continue
            try:
                image, label = decode_sample(sample, owner.resolution, owner.channels)
                if owner.xflip and mirrored(owner.plan.seed, f"{shard_name(sample['__url__'])}/"
                                            f"{sample['__key__']}", owner.epoch):
                    image = image.flip(-1)
                good.append((image, label))
            except BadSample as bad:
                message = f"sample {sample['__key__']!r} of shard {sample['__url__']}: {bad}"
                if owner.strict:
                    raise DataError(message + " (data.strict=true)") from None
                if count:
                    owner.count(SKIPPED_SAMPLE)
                    owner.warn(f"skipping {message}")
        return good

    def raw_from(self, position: int, count: bool) -> Iterator[RawSample | None]:
        """The share's samples in file order from ``position``; None for each one that could not be read."""
        index = bisect.bisect_right(self.segment_starts, position) - 1
        offset = position - self.segment_starts[index]
        for segment in self.segments[index:]:
            yield from self.read_segment(segment, segment.start + offset, count)
            offset = 0

    def read_segment(self, segment, start: int, count: bool) -> Iterator[RawSample | None]:
        owner = self.owner
        url, expected = owner.urls[segment.shard], owner.plan.counts[segment.shard]
        scan_rest, seen, produced = segment.stop == expected, [0], 0
        try:
            for sample in tar_samples(url, start, segment.stop, scan_rest, seen,
                                      owner.offsets[segment.shard], owner.read_timeout):
                produced += 1
                yield sample
        except READ_ERRORS as err:
            if owner.strict:
                raise DataError(f"shard {url} is unreadable: {err}") from None
            if count:
                owner.count(BAD_SHARD)
                owner.warn(f"skipping the rest of unreadable shard {url} after sample "
                           f"{start + produced}: {err}")
        else:
            if scan_rest and seen[0] != expected and count:
                message = (f"shard {url} holds {seen[0]} samples but its manifest entry says "
                           f"{expected}: re-run prepare, or `python -m dist_gan.data verify` the shards")
                if owner.strict:
                    raise DataError(message + " (data.strict=true)")
                owner.warn(message)
            elif produced < segment.stop - start and count:
                message = (f"shard {url} holds {start + produced} samples but its manifest entry says "
                           f"{expected}: re-run prepare, or `python -m dist_gan.data verify` the shards")
                if owner.strict:
                    raise DataError(message + " (data.strict=true)")
                owner.count(BAD_SHARD)
                owner.warn(message)
        yield from itertools.repeat(None, segment.stop - start - produced)


class _Cursor:
    """Reads a share forward from the block holding ``batch``, one shuffled block in memory."""

    def __init__(self, share: _Share, batch: int, count: bool):
        self.share, self.size = share, share.owner.block
        self.block_index = share.batch_starts[batch] // self.size
        self.raw = share.raw_from(self.block_index * self.size, count)
        self.block = self._load()

    def _load(self) -> list[RawSample | None]:
        owner, share = self.share.owner, self.share
        length = min(self.size, share.segment_starts[-1] - self.block_index * self.size)
        samples = list(itertools.islice(self.raw, length))
        if self.size > 1:
            random.Random(derive(owner.plan.seed, "block_shuffle", owner.epoch, owner.rank,
                                 share.reader, self.block_index)).shuffle(samples)
        return samples

    def take(self, batch: int) -> list[RawSample | None]:
        taken = []
        for position in range(self.share.batch_starts[batch], self.share.batch_starts[batch + 1]):
            while position // self.size > self.block_index:
                self.block_index += 1
                self.block = self._load()
            taken.append(self.block[position % self.size])
        return taken


def _collate(good: list[tuple[torch.Tensor, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples from ``good``, repeating its samples in order where bad ones were dropped."""
    chosen = [good[i % len(good)] for i in range(size)]
    return torch.stack([image for image, _ in chosen]), torch.tensor([label for _, label in chosen])


class ShardStream:
    """The loop's ``BatchStream`` over shards: a DataLoader per epoch, batches moved to ``device``."""

    def __init__(self, reader: ShardReader, workers: int, device: torch.device | str = "cpu",
                 pin_memory: bool | None = None, prefetch_factor: int = 4, num_classes: int = 0):
        self.reader, self.workers, self.num_classes = reader, workers, num_classes
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.budget = reader.plan.batches_per_rank
        self.epoch, self.batch = 0, 0
        self._batches: Iterator | None = None

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches every rank delivers in ``epoch``: the same on every rank, and (the number of samples
        being fixed) in every epoch."""
        return self.budget

    def _open_epoch(self) -> None:
        self.reader.epoch, self.reader.start_batch = self.epoch, self.batch
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG each
        # time an iterator opens, which would shift the training noise after a resume.
        seed = torch.Generator().manual_seed(derive(self.reader.plan.seed, "loader", self.epoch))
        loader = DataLoader(self.reader, batch_size=None, num_workers=self.workers,
                            pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.workers > 0 else None,
                            generator=seed, worker_init_fn=ignore_stop_signals)
        self._batches = iter(loader)

    def _next_raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch == self.batches_in_epoch(self.epoch):
            self.epoch, self.batch, self._batches = self.epoch + 1, 0, None
        if self._batches is None:  # a new epoch, or a position just restored: seek to it
            self._open_epoch()
        assert self._batches is not None
        try:
            return next(self._batches)
        except DataError as err:
            raise worker_error(err) from None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._next_raw()
        self.batch += 1
        check_labels(labels, self.num_classes)
        images = to_model_range(images.to(self.device, non_blocking=True))
        return images, labels.to(self.device, non_blocking=True)

    def counters(self) -> dict[str, int]:
        """Bad samples and unreadable shards met by this rank's readers so far (including read-ahead)."""
        return dict(zip(BAD_COUNTS, self.reader.bad_counts[:]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def close(self) -> None:
        """Stop the loader workers now (dropping the iterator shuts them down through the
        DataLoader's own protocol) rather than whenever the iterator is collected."""
        self._batches = None

    def load_state_dict(self, state: dict) -> None:
        # min(): a position saved at another world size may lie past this rank's epoch end
        self.epoch = int(state["epoch"])
        self.batch = min(int(state["batch"]), self.batches_in_epoch(self.epoch))
        self._batches = None
