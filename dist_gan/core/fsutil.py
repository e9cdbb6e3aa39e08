"""Files written so that a crash leaves the old version or the new one, never half of one: fsync,
atomic replacement, checksums, and the mount point a disk-full message names."""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from pathlib import Path

_NUMBER_LIST = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")


def write_synced(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def json_text(data: object) -> str:
    """Indented JSON, except that lists of numbers (sample offsets, say) stay on one line."""
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r"\s+", "", m[1]) + "]", json.dumps(data, indent=1))


def write_json_atomically(path: Path, data: object) -> None:
    """``path`` holds the old JSON or the new, whole and synced, whenever the process dies."""
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, json_text(data))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under ``root``, then every folder, deepest first."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fsync_file(path)
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(folder)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def crc32_of(path: Path) -> str:
    """CRC-32 of a file as 8 hex digits (about 2 GB/s; docs/scale.md has the measured cost)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def mount_point(path: Path) -> Path:
    """The mount point holding ``path`` (named in disk-full messages)."""
    path = Path(path).resolve()
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path
