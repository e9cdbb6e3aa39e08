"""WebDataset shards: writing them from a source, their manifest, and checking shards against it.

A shard is ``<split>-NNNNNN.tar`` holding one sample per image: ``<key>.u8`` (raw uint8 C x H x W bytes,
the shape in the manifest), ``<key>.png`` or ``<key>.jpg``, and ``<key>.cls`` (the label as text, -1 when
the dataset has no classes). ``manifest.json`` beside the shards records, per
split, the encoding and every shard's sample count, size, sha256 and each sample's byte offset, plus
resolution, channels, class names and source. The loader needs the counts to give every rank the same
number of batches without reading the data, and the offsets to resume mid-shard without reading the
headers before the position.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from dist_gan.core.fsutil import fsync_file, json_text, mount_point, sha256_of, write_synced
from dist_gan.data.sources import DataError, ImageSet

log = logging.getLogger(__name__)

SHARD_MANIFEST = "manifest.json"
SHARD_MANIFEST_FORMAT = "dist_gan.shards/1"
MAX_SKIP_WARNINGS = 10  # unreadable images named in the log when preparing; the rest are counted
_SHARD_NAME = re.compile(r"([^/\s]+\.tar)(?:\s|$)")


# How an image is stored in a shard: the member's extension for each encoding.
ENCODINGS = {"png": "png", "raw": "u8", "jpg": "jpg"}
# "auto" stores images up to this many bytes (64 x 64 RGB) raw: decoding a small PNG costs more CPU
# per image than reading its few kilobytes, on the cores the training step needs; larger images are
# stored as PNG, which saves real disk and network.
RAW_MAX_BYTES = 64 * 64 * 3
JPEG_QUALITY = 95


def resolve_encoding(encoding: str, resolution: int, channels: int) -> str:
    """``auto`` -> raw for images up to RAW_MAX_BYTES, png above; any other name is checked."""
    if encoding == "auto":
        return "raw" if resolution * resolution * channels <= RAW_MAX_BYTES else "png"
    if encoding not in ENCODINGS:
        raise DataError(f"encoding {encoding!r} is not one of auto, {', '.join(ENCODINGS)}")
    return encoding


def encode_image(image: torch.Tensor, encoding: str = "png") -> tuple[str, bytes]:
    """uint8 (C, H, W) with C = 1 or 3 -> (member extension, bytes). raw is the C x H x W bytes as they
    are (the shape is in the manifest); png is lossless (mode L or RGB); jpg is quality 95 (lossy)."""
    array = image.numpy()
    if encoding == "raw":
        return ENCODINGS["raw"], np.ascontiguousarray(array).tobytes()
    pil = Image.fromarray(array[0], "L") if array.shape[0] == 1 else Image.fromarray(
        np.ascontiguousarray(array.transpose(1, 2, 0)), "RGB")
    buffer = io.BytesIO()
    if encoding == "jpg":
        pil.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        pil.save(buffer, format="PNG")
    return ENCODINGS[encoding], buffer.getvalue()


def member_key(name: str) -> tuple[str, str]:
    """WebDataset's grouping of tar members into samples: (key, extension), the key being the
    member's path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def sample_offsets(path: Path) -> list[int]:
    """The byte offset of each sample's first tar header, in file order: where a reader that resumes
    at that sample starts (a seek, or an HTTP Range request), instead of reading the headers before."""
    offsets, current = [], None
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _ = member_key(member.name)
            if key != current:
                offsets.append(member.offset)
                current = key
    return offsets


@dataclass(frozen=True)
class ShardEntry:
    """A shard to read: its URL, its sample count and (from the manifest, when it records them) the
    byte offset of each sample."""

    url: str
    count: int
    offsets: list[int] | None = None


@contextlib.contextmanager
def shard_dir_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold ``out_dir/.lock`` exclusively while shards are checked and written there.

    A second writer (another run preparing the same directory) waits, then finds the shards
    written and reuses them. ``flock`` holds between processes of one host; across hosts it holds
    only where the shared filesystem implements it (NFSv4 and Lustre mounted with ``flock`` do;
    others may grant every host the lock), so on a cluster prepare shards once, before the job.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is writing shards in %s: waiting for it", out_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def write_shards(images: ImageSet, out_dir: str | Path, split: str, shard_size: int, source: str,
                 resolution: int, channels: int, progress: bool = True, strict: bool = False,
                 extra: dict | None = None, replace: bool = False, encoding: str = "png") -> dict:
    """Write ``images`` as ``out_dir/<split>-NNNNNN.tar`` shards and record them in the manifest.

    Nothing in ``out_dir`` changes until every image has been read and the new manifest is on disk:
    the shards are written into a staging folder, checked, the new manifest written beside the old
    one, then the shards moved over the old ones and the manifest replaced last (atomically). A corrupt
    source, a full disk or an incompatible manifest leaves the existing shards and manifest whole.
    Unreadable images are skipped, counted and logged (``strict``: the first one is an error).
    ``encoding``: how images are stored (``encode_image``; ``auto`` is resolved by ``resolve_encoding``).
    ``extra``: entries added to the manifest (a folder's fingerprint); ``replace``: start a new
    manifest instead of adding this split to the existing one (the caller wrote that one). The
    caller holds ``shard_dir_lock(out_dir)``.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / SHARD_MANIFEST
    manifest = read_shard_manifest(manifest_path) if manifest_path.is_file() and not replace else {}
    if manifest and (manifest["resolution"], manifest["channels"]) != (resolution, channels):
        raise DataError(f"{manifest_path} describes {manifest['resolution']}px x "
                        f"{manifest['channels']} channels; refusing to add {resolution}px x {channels} "
                        "(nothing was changed: write them to another directory)")
    encoding = resolve_encoding(encoding, resolution, channels)
    manifest.pop("folder", None)  # only a folder run (extra=) records a fingerprint: no stale one survives
    staging = out_dir / f".{split}-prepare.tmp"
    pending = manifest_path.with_name(manifest_path.name + ".tmp")
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed writer (we hold the lock)
        staging.mkdir(parents=True)
        written, skipped = _write_tars(images, staging, split, shard_size, progress, strict, encoding)
        if written == 0:
            raise DataError(f"no readable image among the {len(images)} of {source}: no shards written")
        new = sorted(staging.glob(f"{split}-*.tar"))
        counts = [min(shard_size, written - i * shard_size) for i in range(len(new))]
        entries = [{"name": p.name, "count": c, "bytes": p.stat().st_size, "sha256": sha256_of(p),
                    "offsets": sample_offsets(p)} for p, c in zip(new, counts)]
        for path in new:
            fsync_file(path)
        manifest.update(format=SHARD_MANIFEST_FORMAT, source=source, resolution=resolution,
                        channels=channels, class_names=list(images.class_names), **(extra or {}))
        manifest.setdefault("splits", {})[split] = {"total": written, "skipped_unreadable": skipped,
                                                    "encoding": encoding, "shards": entries}
        write_synced(pending, json_text(manifest))  # the last write that can fail for want of space
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        pending.unlink(missing_ok=True)
        if _disk_full(err):
            raise DataError(f"no space left on {mount_point(out_dir)} while writing {split} shards into "
                            f"{out_dir}: nothing there was changed; free space or choose another "
                            "directory") from None
        raise
    names = {p.name for p in new}
    for path in new:
        os.replace(path, out_dir / path.name)
    for stale in out_dir.glob(f"{split}-*.tar"):
        if stale.name not in names:
            stale.unlink()
    staging.rmdir()
    os.replace(pending, manifest_path)
    log.info("wrote %d %s samples (%s) in %d shards to %s%s", written, split, encoding, len(new), out_dir,
             f" ({skipped} unreadable images skipped)" if skipped else "")
    return manifest


def _write_tars(images: ImageSet, out_dir: Path, split: str, shard_size: int, progress: bool,
                strict: bool, encoding: str) -> tuple[int, int]:
    """Write the readable ``images`` as shards into ``out_dir``; return (written, skipped)."""
    written = skipped = 0
    # Plain ustar members with a whole-number mtime (0): WebDataset's default, the time as a float,
    # gives every member a PAX header, which doubles the members a reader parses and makes every
    # prepare differ; these shards are the same bytes each time they are written from the same data.
    with wds.ShardWriter(str(out_dir / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0,
                         mtime=0, format=tarfile.USTAR_FORMAT) as sink:
        for index in tqdm(range(len(images)), desc=f"writing {split} shards", unit="img",
                          disable=not progress, mininterval=1.0):
            try:
                image, label = images[index]
            except DataError as err:
                if strict:
                    raise DataError(f"{err} (--strict: stopping; without it unreadable images are "
                                    "skipped and counted)") from None
                skipped += 1
                if skipped <= MAX_SKIP_WARNINGS:
                    log.warning("skipping %s", err)
                continue
            extension, payload = encode_image(image, encoding)
            sink.write({"__key__": f"{index:08d}", extension: payload, "cls": str(label).encode()})
            written += 1
    return written, skipped




def read_shard_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard manifest not found: {path} (write shards with `python -m dist_gan.data "
                        "prepare`, or set data.manifest)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"shard manifest {path} is not valid JSON: {err}") from err
    if manifest.get("format") != SHARD_MANIFEST_FORMAT:
        raise DataError(f"{path} is not a dist_gan shard manifest (format {manifest.get('format')!r})")
    return manifest


def expand_urls(pattern: str) -> list[str]:
    """``data/x/train-{000000..000003}.tar`` -> four URLs (also ``a.tar::b.tar`` lists)."""
    return [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]


def local_path(url: str) -> Path | None:
    """The file behind a URL, or None for a URL we cannot stat (``pipe:``, ``s3://``, ...)."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if ":" in url.split("/")[0]:
        return None
    return Path(url)


def shard_name(url: str) -> str:
    """The shard's file name inside any URL, ``pipe:aws s3 cp s3://b/train-000001.tar -`` included."""
    match = _SHARD_NAME.search(url)
    if not match:
        raise DataError(f"cannot find a <name>.tar in shard URL {url!r}")
    return Path(match.group(1)).name


def default_manifest_path(pattern: str) -> Path | None:
    first = local_path(expand_urls(pattern)[0])
    return first.parent / SHARD_MANIFEST if first is not None else None


def resolve_shards(pattern: str, manifest_path: str | None, resolution: int, channels: int,
                   strict: bool = False) -> tuple[list[ShardEntry], dict]:
    """Check ``pattern`` against its manifest; return the shards to read and the manifest.

    A shard missing from the manifest is always an error. A shard whose size differs from the
    manifest (truncated, rewritten) is an error under ``strict``; otherwise a warning, and the loader
    skips whatever part of it cannot be read.
    """
    urls = expand_urls(pattern)
    local = [local_path(u) for u in urls]
    files = [p for p in local if p is not None]
    if len(files) == len(local) and not any(p.is_file() for p in files):
        raise DataError(f"shard pattern {pattern} (data.shards) matches no file")
    for path in local:
        if path is not None and not path.is_file():
            raise DataError(f"shard {path} named by data.shards={pattern} does not exist")
    path = Path(manifest_path) if manifest_path else default_manifest_path(pattern)
    if path is None:
        raise DataError(f"data.manifest must be set for remote shards ({urls[0]})")
    manifest = read_shard_manifest(path)
    if (manifest["resolution"], manifest["channels"]) != (resolution, channels):
        raise DataError(f"{path} describes {manifest['resolution']}px x {manifest['channels']} channel "
                        f"images but data.resolution={resolution}, data.channels={channels}")
    listed = {e["name"]: e for split in manifest["splits"].values() for e in split["shards"]}
    shards = []
    for url, file in zip(urls, local):
        entry = listed.get(shard_name(url))
        if entry is None:
            raise DataError(f"shard {url} is not listed in manifest {path}")
        if file is not None and file.stat().st_size != entry["bytes"]:
            message = (f"shard {file} has {file.stat().st_size} bytes but manifest {path} says "
                       f"{entry['bytes']}: re-run prepare or restore the shard")
            if strict:
                raise DataError(message + " (data.strict=true)")
            log.warning("%s; reading what it holds", message)
        shards.append(ShardEntry(url, int(entry["count"]), entry.get("offsets")))
    return shards, manifest


def count_samples(path: Path) -> int:
    """Samples in a shard: distinct keys (member names up to their first dot, as WebDataset groups)."""
    with tarfile.open(path) as tar:
        return len({Path(m.name).name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def verify_shards(pattern: str, manifest_path: str | None = None) -> list[str]:
    """Check every local shard against its manifest entry (sha256, then sample count); return one
    "<shard>: <what differs>" line per shard that disagrees."""
    remote = [url for url in expand_urls(pattern) if local_path(url) is None]
    if remote:
        raise DataError(f"verify reads local shard files; {remote[0]!r} is not one (pipe:, http(s)://, "
                        "s3://...): verify the shards where they are stored, or copy them here first")
    path = Path(manifest_path) if manifest_path else default_manifest_path(pattern)
    assert path is not None  # every shard is local (checked above)
    listed = {e["name"]: e for split in read_shard_manifest(path)["splits"].values() for e in split["shards"]}
    problems = []
    for url in expand_urls(pattern):
        file = local_path(url)
        if file is None:
            continue
        entry = listed.get(shard_name(url))
        if entry is None:
            problems.append(f"{url}: not listed in {path}")
        elif not file.is_file():
            problems.append(f"{url}: missing")
        elif sha256_of(file) != entry["sha256"]:
            problems.append(f"{url}: sha256 differs from the manifest")
        elif (found := count_samples(file)) != entry["count"]:
            problems.append(f"{url}: {found} samples, the manifest says {entry['count']}")
    return problems
