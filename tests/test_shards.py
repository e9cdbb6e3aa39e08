"""WebDataset shards: writing, reading back exactly, splitting over ranks and workers, bad data."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from dist_gan.config import DataConfig
from dist_gan.data import DataError, build_batch_stream, load_mnist_idx, prepare_shards
from dist_gan.data.shards import SHARD_MANIFEST, write_shards
from dist_gan.data.sources import TensorImageSet

from helpers import add_broken_samples, labels_of, replace_sample, stream, tiny_shards

pytestmark = pytest.mark.tier("unit")


def test_mnist_round_trip_is_exact(mnist_dir, mnist_shards):
    s = build_batch_stream(DataConfig(shards=mnist_shards, batch_size=500, workers=2), 0, 0, 1, "cpu")
    assert s.budget == 120
    seen = []
    for _ in range(s.budget):
        x, y = s.next_batch()
        assert x.min() >= -1 and x.max() <= 1
        pixels = ((x + 1) * 127.5).round().to(torch.uint8).view(len(x), -1)
        seen += [(int(label), row.numpy().tobytes()) for label, row in zip(y, pixels)]
    images, labels = load_mnist_idx(mnist_dir)
    expected = [(int(label), row.numpy().tobytes()) for label, row in zip(labels, images.view(60000, -1))]
    assert Counter(seen) == Counter(expected)
    manifest = json.loads(open(mnist_shards.rsplit("/", 1)[0] + "/" + SHARD_MANIFEST).read())
    assert manifest["splits"]["train"]["total"] == 60000 and manifest["class_names"][3] == "3"
    assert all(len(e["sha256"]) == 64 and e["count"] == 10000 for e in manifest["splits"]["train"]["shards"])


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path):
    pattern, _ = tiny_shards(tmp_path)  # 8 shards x 24 = 192 samples; 2 ranks x 2 workers
    ranks = [stream(pattern, rank=r, world=2) for r in (0, 1)]
    assert ranks[0].budget == ranks[1].budget == 16  # 96 samples per rank / 6
    epoch0 = [labels_of(s, 16) for s in ranks]
    assert not set(epoch0[0]) & set(epoch0[1])
    assert sorted(epoch0[0] + epoch0[1]) == list(range(192))
    epoch1 = [labels_of(s, 16) for s in ranks]
    assert sorted(epoch1[0] + epoch1[1]) == list(range(192))
    assert epoch1[0] != epoch0[0]  # a new shard order and shuffle each epoch
    again = [labels_of(stream(pattern, rank=r, world=2), 32) for r in (0, 1)]
    assert again == [epoch0[r] + epoch1[r] for r in (0, 1)]  # same seed, same order


def test_resume_mid_epoch_continues_the_stream(tmp_path):
    pattern, _ = tiny_shards(tmp_path)
    a = stream(pattern)
    labels_of(a, 40)  # into the second epoch (32 batches each)
    b = stream(pattern)
    b.load_state_dict(a.state_dict())
    assert labels_of(a, 10) == labels_of(b, 10)


def test_resampled_mode_is_seeded(tmp_path):
    pattern, _ = tiny_shards(tmp_path)
    first = labels_of(stream(pattern, resampled=True), 40)  # 240 draws from 192 samples
    assert first == labels_of(stream(pattern, resampled=True), 40)
    assert len(set(first)) < len(first)  # drawn with replacement


def truncate(path, keep_bytes):
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])


def append_sample(path, key):
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo(f"{key}.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))


def test_bad_shards_are_skipped_and_counted(tmp_path, caplog):
    pattern, _ = tiny_shards(tmp_path, n_shards=3, per_shard=24)
    truncate(tmp_path / "train-000000.tar", 24 * 1024 + 700)  # part way through a sample
    garbled, no_image = add_broken_samples(tmp_path / "train-000001.tar")
    append_sample(tmp_path / "train-000002.tar", "zz_extra")
    with caplog.at_level(logging.WARNING):
        s = stream(pattern, workers=0, shuffle_buffer=0, batch_size=2)
        assert s.budget == 36
        labels = labels_of(s, 36)  # the whole epoch: every batch there, bad samples replaced
    assert "has 25276 bytes but manifest" in caplog.text
    assert "unreadable shard" in caplog.text and "train-000000.tar" in caplog.text
    assert f"skipping sample '{garbled}' of shard" in caplog.text and "undecodable png" in caplog.text
    assert f"skipping sample '{no_image}' of shard" in caplog.text and ": no image" in caplog.text
    assert "train-000002.tar holds 25 samples but its manifest entry says 24" in caplog.text
    counters = s.counters()
    assert counters["data_bad_shards"] == 1 and counters["data_skipped_samples"] == 2
    assert len(labels) == 72 and set(range(48, 72)) <= set(labels)  # the intact shard in full
    assert set(range(24, 48)) - set(labels) == {int(garbled), int(no_image)}
    resumed = stream(pattern, workers=0, shuffle_buffer=0, batch_size=2)  # seeking past the damage
    resumed.load_state_dict({"epoch": 0, "batch": 21})
    assert labels_of(resumed, 15) == labels[42:]


@pytest.mark.parametrize("damage,pattern", [
    ("truncate", r"train-000000\.tar has 25276 bytes but manifest .* \(data\.strict=true\)"),
    ("broken", r"sample '00000027' of shard .*train-000001\.tar: undecodable png"),
])
def test_strict_mode_names_shard_and_sample(tmp_path, damage, pattern):
    shards, _ = tiny_shards(tmp_path, n_shards=2, per_shard=24)
    if damage == "truncate":
        truncate(tmp_path / "train-000000.tar", 24 * 1024 + 700)
    else:
        replace_sample(tmp_path / "train-000001.tar", 3, [("png", b"not a png"), ("cls", b"1")])
    with pytest.raises(DataError, match=pattern):
        s = stream(shards, workers=0, shuffle_buffer=0, batch_size=2, strict=True)
        labels_of(s, 24)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("image,message", [
    (Image.new("L", (9, 9)), "L 9x9 image, expected L 8x8"),
    (Image.new("RGB", (8, 8)), "RGB 8x8 image, expected L 8x8"),
])
def test_wrong_size_or_mode_is_a_bad_sample(tmp_path, image, message):
    shards, _ = tiny_shards(tmp_path, n_shards=2, per_shard=12)
    odd = replace_sample(tmp_path / "train-000001.tar", 4, [("png", png_bytes(image)), ("cls", b"3")])
    s = stream(shards, workers=0, shuffle_buffer=0, batch_size=2)
    assert sorted(set(labels_of(s, 12))) == sorted(set(range(24)) - {int(odd)})  # none of the odd one
    assert s.counters()["data_skipped_samples"] == 1
    with pytest.raises(DataError, match=f"sample '{odd}' of shard .*: {message}"):
        labels_of(stream(shards, workers=0, shuffle_buffer=0, batch_size=2, strict=True), 12)


def test_pattern_and_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"shard pattern .*nothing-\{0\.\.3\}\.tar \(data\.shards\) matches no file"):
        stream(str(tmp_path / "nothing-{0..3}.tar"))
    pattern, _ = tiny_shards(tmp_path, n_shards=2)
    with pytest.raises(DataError, match=r"train-000002\.tar named by data\.shards=.* does not exist"):
        stream(pattern.replace("000001}", "000002}"))
    (tmp_path / "extra-000000.tar").write_bytes((tmp_path / "train-000000.tar").read_bytes())
    with pytest.raises(DataError, match=r"shard .*extra-000000\.tar is not listed in manifest"):
        stream(str(tmp_path / "extra-000000.tar"))
    with pytest.raises(DataError, match=r"describes 8px x 1 channel images but data\.resolution=8, data\.channels=3"):
        stream(pattern, channels=3)
    (tmp_path / SHARD_MANIFEST).unlink()
    with pytest.raises(DataError, match=r"shard manifest not found: .*manifest\.json"):
        stream(pattern)


@pytest.mark.tier("e2e")  # the loader starts the pipe: command (curl, cat)
def test_pipe_urls_stream_from_a_command(tmp_path):
    pattern, _ = tiny_shards(tmp_path, n_shards=2)
    piped = "::".join(f"pipe:cat {tmp_path}/train-00000{i}.tar" for i in range(2))
    s = stream(piped, manifest=str(tmp_path / SHARD_MANIFEST), workers=0)
    assert sorted(labels_of(s, s.budget)) == list(range(48))


def make_folder(root, classes, mode):
    colour = {"L": 128, "RGB": (10, 200, 30)}[mode]
    for c in classes or [None]:
        folder = root / c if c else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new(mode, (40 + 10 * i, 30), colour).save(folder / f"img{i}.png")


@pytest.mark.parametrize("channels,classes", [(1, ["cat", "dog"]), (3, ["cat", "dog"]), (1, None), (3, None)])
def test_folder_source_to_shards_and_back(tmp_path, channels, classes):
    make_folder(tmp_path / "images", classes, "RGB")
    cfg = DataConfig(source="folder", root=str(tmp_path / "images"), resolution=16, channels=channels,
                     shard_size=4)
    manifest = prepare_shards(cfg, tmp_path / "shards", progress=False)
    n = 3 * len(classes or [None])
    assert manifest["splits"]["train"]["total"] == n and manifest["class_names"] == (classes or [])
    names = sorted(p.name for p in (tmp_path / "shards").glob("train-*.tar"))
    s = stream(str(tmp_path / "shards" / f"train-{{000000..{len(names) - 1:06d}}}.tar"), resolution=16,
               channels=channels, batch_size=1, workers=0)
    batches = [s.next_batch() for _ in range(n)]
    assert all(x.shape == (1, channels, 16, 16) for x, _ in batches)
    assert sorted(int(y) for _, y in batches) == (sorted([0, 0, 0, 1, 1, 1]) if classes else [-1] * 3)
    if channels == 3:  # the colour survived: green channel brightest
        x = batches[0][0][0]
        assert x[1].mean() > x[0].mean() and x[1].mean() > x[2].mean()


@pytest.mark.tier("e2e")
def test_verify_command_checks_sha256(tmp_path):
    from conftest import run_cli

    pattern, _ = tiny_shards(tmp_path, n_shards=2)
    assert run_cli(["dist_gan.data", "verify", pattern]).returncode == 0
    shard = tmp_path / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, different content: only the hash can tell
    shard.write_bytes(bytes(data))
    proc = run_cli(["dist_gan.data", "verify", pattern], check=False)
    assert proc.returncode != 0 and "train-000001.tar" in proc.stderr and "train-000000" not in proc.stderr


def make_cifar10(root, per_batch=3):
    """A tiny CIFAR-10 in the distributed python format: 5 train batches, a test batch, the meta file."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        if name != "test_batch":
            train += [(label, row.tobytes()) for label, row in zip(labels, data)]
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
             b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return train


@pytest.mark.tier("e2e")
def test_cifar10_source_to_shards_and_back_exactly(tmp_path):
    from conftest import run_cli

    train = make_cifar10(tmp_path / "cifar")  # 15 training images
    run_cli(["dist_gan.data", "prepare", "--source=cifar10", f"--root={tmp_path / 'cifar'}",
             f"--out={tmp_path / 'shards'}", "--shard_size=4"])
    manifest = json.loads((tmp_path / "shards" / SHARD_MANIFEST).read_text())
    assert manifest["splits"]["train"]["total"] == 15 and manifest["class_names"][9] == "truck"
    assert (manifest["resolution"], manifest["channels"]) == (32, 3)
    s = stream(str(tmp_path / "shards" / "train-{000000..000003}.tar"), resolution=32, channels=3,
               batch_size=1, workers=0, shuffle_buffer=0)
    seen = []
    for _ in range(15):
        x, y = s.next_batch()
        pixels = ((x[0] + 1) * 127.5).round().to(torch.uint8)
        seen.append((int(y), pixels.numpy().tobytes()))
    assert Counter(seen) == Counter(train)  # CHW order, as CIFAR-10 stores it

    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3").unlink()
    proc = run_cli(["dist_gan.data", "prepare", "--source=cifar10", f"--root={tmp_path / 'cifar'}",
                    f"--out={tmp_path / 'again'}"], check=False)
    assert proc.returncode != 0 and "data_batch_3 is missing" in proc.stderr


def test_fewer_shards_than_readers_split_inside_shards_and_resume_anywhere(tmp_path):
    """2 shards (one short) for 3 ranks x 2 workers: each rank reads a disjoint share of equal size,
    and a stream restored at any position continues exactly as the uninterrupted one."""
    images = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8)
    write_shards(TensorImageSet(images, torch.arange(100)), tmp_path, "train", 70, "test", 8, 1,
                 progress=False)  # 70 + 30
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    ranks = [stream(pattern, rank=r, world=3, batch_size=4, shuffle_buffer=5) for r in range(3)]
    assert {s.budget for s in ranks} == {8}  # 100 // 6 = 16 samples per reader: 2 x 4 batches of 4
    epochs = [[labels_of(s, 8) for s in ranks] for _ in range(2)]
    for epoch in epochs:
        seen = [label for rank in epoch for label in rank]
        assert len(seen) == len(set(seen)) == 96  # disjoint, 96% of 100 (2 ranks' worth would be 64)
    whole = [label for e in epochs for label in e[1]]
    for position in (1, 4, 7, 8, 11):
        resumed = stream(pattern, rank=1, world=3, batch_size=4, shuffle_buffer=5)
        resumed.load_state_dict({"epoch": position // 8, "batch": position % 8})
        assert labels_of(resumed, 16 - position) == whole[position * 4:]


@pytest.mark.tier("e2e")
def test_prepare_can_write_a_multiple_of_n_equal_shards(tmp_path):
    from conftest import run_cli

    train = make_cifar10(tmp_path / "cifar", per_batch=5)  # 25 training images
    run_cli(["dist_gan.data", "prepare", "--source=cifar10", f"--root={tmp_path / 'cifar'}",
             f"--out={tmp_path / 'shards'}", "--shard_size=10", "--shards_multiple_of=4"])
    counts = [e["count"] for e in json.loads((tmp_path / "shards" / SHARD_MANIFEST).read_text())
              ["splits"]["train"]["shards"]]
    assert counts == [7, 7, 7, 4] and sum(counts) == len(train)  # 4 shards of at most 10


def members_of(shard):
    with tarfile.open(shard) as tar:
        return sorted({m.name.split(".", 1)[1] for m in tar.getmembers()})


@pytest.mark.parametrize("encoding,channels,member,exact", [
    ("raw", 1, "u8", True), ("raw", 3, "u8", True), ("png", 3, "png", True), ("jpg", 3, "jpg", False),
])
def test_each_encoding_round_trips_and_is_recorded(tmp_path, encoding, channels, member, exact):
    # smooth images: JPEG's loss on them is small, so "close" can be told from "wrong"
    ramp = torch.linspace(0, 255, 16).round().to(torch.uint8)
    images = torch.stack([(ramp.view(1, 1, 16) // (1 + i % 3) + ramp.view(1, 16, 1) // 4).expand(channels, 16, 16)
                          for i in range(12)]).contiguous()
    manifest = write_shards(TensorImageSet(images, torch.arange(12)), tmp_path, "train", 6, "test", 16,
                            channels, progress=False, encoding=encoding)
    assert manifest["splits"]["train"]["encoding"] == encoding
    assert members_of(tmp_path / "train-000000.tar") == ["cls", member]
    s = stream(str(tmp_path / "train-{000000..000001}.tar"), resolution=16, channels=channels,
               batch_size=12, workers=0, shuffle_buffer=0)
    x, y = s.next_batch()
    got = ((x + 1) * 127.5).round().to(torch.uint8)
    expected = images[y]
    if exact:
        assert torch.equal(got, expected)
    else:
        assert (got.float() - expected.float()).abs().mean() < 3  # lossy, but the same pictures


def test_auto_encoding_is_raw_for_small_images_and_png_for_large(tmp_path):
    from dist_gan.data.shards import resolve_encoding

    assert resolve_encoding("auto", 28, 1) == "raw" and resolve_encoding("auto", 64, 3) == "raw"
    assert resolve_encoding("auto", 128, 3) == "png" and resolve_encoding("auto", 256, 1) == "png"
    with pytest.raises(DataError, match="encoding 'webp' is not one of auto, png, raw, jpg"):
        resolve_encoding("webp", 28, 1)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    cfg = DataConfig(source="folder", resolution=8, channels=1)
    assert cfg.encoding == "auto"
    manifest = write_shards(TensorImageSet(images, torch.arange(4)), tmp_path, "train", 4, "test", 8, 1,
                            progress=False, encoding=cfg.encoding)
    assert manifest["splits"]["train"]["encoding"] == "raw"


def test_a_raw_sample_of_the_wrong_length_is_a_bad_sample(tmp_path):
    shards, _ = tiny_shards(tmp_path, n_shards=2, per_shard=12, encoding="raw")
    odd = replace_sample(tmp_path / "train-000001.tar", 4, [("u8", bytes(63)), ("cls", b"3")])
    s = stream(shards, workers=0, shuffle_buffer=0, batch_size=2)
    assert sorted(set(labels_of(s, 12))) == sorted(set(range(24)) - {int(odd)})
    assert s.counters()["data_skipped_samples"] == 1
    with pytest.raises(DataError, match=f"sample '{odd}' of shard .*: raw image of 63 bytes, expected 64 "
                                        r"\(1 x 8 x 8\)"):
        labels_of(stream(shards, workers=0, shuffle_buffer=0, batch_size=2, strict=True), 12)


def test_prepare_command_takes_the_encoding(tmp_path, mnist_dir):
    from dist_gan.data.__main__ import prepare

    prepare("mnist", str(tmp_path / "png"), split="test", mnist_dir=str(mnist_dir), encoding="png",
            shard_size=5000)
    manifest = json.loads((tmp_path / "png" / SHARD_MANIFEST).read_text())
    assert manifest["splits"]["test"]["encoding"] == "png"
    assert members_of(tmp_path / "png" / "test-000000.tar") == ["cls", "png"]
    with pytest.raises(SystemExit, match=r"data\.encoding.*'bmp'"):
        prepare("mnist", str(tmp_path / "bad"), split="test", mnist_dir=str(mnist_dir), encoding="bmp")


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_loaders_tar_reader_reads_what_tarfile_writes(tmp_path, tar_format):
    from dist_gan.data.loader import TarReader

    files = [("d" * 130 + "/x.u8", bytes(range(256)) * 3), ("k.cls", b"3"), ("e.png", b"")]
    if tar_format != tarfile.USTAR_FORMAT:  # names ustar cannot hold: a long one, a non-ASCII one
        files += [("n" * 150 + ".cls", b"long"), ("caf\u00e9.cls", b"7")]
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        folder = tarfile.TarInfo("folder")  # a directory, and a link: not samples
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "e.png"
        tar.addfile(link)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime: PAX adds a header for it
            tar.addfile(info, io.BytesIO(data))
    for seekable in (True, False):
        with open(path, "rb") as handle:
            reader = TarReader(handle, seekable)
            assert [(name, reader.data()) for name in reader.members()] == files
    damaged = bytearray(path.read_bytes())
    damaged[1024 + 100] ^= 0x01  # inside the third header (after the directory and the link)
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(TarReader(io.BytesIO(bytes(damaged)), seekable=False).members())
