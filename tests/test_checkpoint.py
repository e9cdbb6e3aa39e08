"""Which checkpoint folders count: the manifest is the only mark of a complete one."""

from __future__ import annotations

import json

import pytest

from dist_gan.run.checkpoint import MANIFEST_FORMAT, CheckpointError, list_checkpoints, read_manifest
from dist_gan.run.retention import prune_checkpoints, remove_stale_staging, resolve_resume

pytestmark = pytest.mark.tier("unit")


def fake_checkpoint(root, step, complete=True, files=None):
    folder = root / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    files = files or {"trainer_state.pt": b"x" * 10}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    if complete:
        manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": 1,
                    "distributed_type": "DistributedType.NO",
                    "files": {name: len(data) for name, data in files.items()}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_only_folders_with_a_manifest_are_checkpoints(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, complete=False)  # a save that died before its manifest
    (tmp_path / "checkpoints" / "step_00000030.tmp").mkdir()  # one that died earlier still
    staged = fake_checkpoint(tmp_path, 40)  # one killed after its manifest, before the rename
    staged.rename(staged.with_name("step_00000040.tmp"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010"]
    assert resolve_resume("auto", tmp_path).name == "step_00000010"
    remove_stale_staging(tmp_path)
    assert not (tmp_path / "checkpoints" / "step_00000030.tmp").exists()
    assert not (tmp_path / "checkpoints" / "step_00000040.tmp").exists()


def test_keep_last_never_deletes_the_only_complete_checkpoint(tmp_path):
    only = fake_checkpoint(tmp_path, 10)
    newer_but_incomplete = [fake_checkpoint(tmp_path, s, complete=False) for s in (20, 30)]
    assert prune_checkpoints(tmp_path, keep_last=1) == []
    assert only.is_dir() and all(p.is_dir() for p in newer_but_incomplete)
    fake_checkpoint(tmp_path, 40)
    fake_checkpoint(tmp_path, 50)
    assert [p.name for p in prune_checkpoints(tmp_path, keep_last=2)] == ["step_00000010"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000040", "step_00000050"]


def test_a_checkpoint_that_disagrees_with_its_manifest_is_refused_by_file(tmp_path):
    folder = fake_checkpoint(tmp_path, 10, files={"G/optimizer.bin": b"1234", "trainer_state.pt": b"ab"})
    read_manifest(folder)
    (folder / "G" / "optimizer.bin").write_bytes(b"12")
    (folder / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        read_manifest(folder)
    assert "G/optimizer.bin: 2 bytes, manifest says 4" in str(err.value)
    assert "trainer_state.pt: missing" in str(err.value)
