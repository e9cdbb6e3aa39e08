"""core.fsutil: the one home of fsync, atomic JSON and checksums (the checkpoint format, the shard
writer and the export all use it)."""

from __future__ import annotations

import hashlib
import json
import zlib

import pytest

from dist_gan.core.fsutil import crc32_of, json_text, mount_point, sha256_of, write_json_atomically

pytestmark = pytest.mark.tier("unit")


def test_atomic_json_replaces_whole_and_keeps_number_lists_on_one_line(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    write_json_atomically(target, {"offsets": [0, 512, 1024], "name": "x"})
    assert json.loads(target.read_text()) == {"offsets": [0, 512, 1024], "name": "x"}
    assert '"offsets": [0,512,1024]' in target.read_text()
    assert not (tmp_path / "manifest.json.tmp").exists()
    assert json.loads(json_text({"a": [[1, 2], {"b": [3]}]})) == {"a": [[1, 2], {"b": [3]}]}


def test_checksums_match_the_standard_library(tmp_path):
    data = bytes(range(256)) * 5000
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()
    assert crc32_of(path) == f"{zlib.crc32(data):08x}"
    assert mount_point(path).is_dir() and path.resolve().is_relative_to(mount_point(path))
