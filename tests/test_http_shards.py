"""Shards streamed from a real web server (nginx on a free localhost port): plain http:// URLs and
`pipe:curl` read what local files hold, a resume starts each reader with a Range request at its
sample's byte offset, and a missing shard, a body cut off mid-transfer and a server that stops
mid-epoch are counted and named (data.strict: an error naming the URL)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from dist_gan.data import DataError
from dist_gan.data.shards import SHARD_MANIFEST

from conftest import FAST, missing_prerequisite, read_metrics, run_cli
from helpers import CPU_DDP, assert_same_weights, kill_and_resume, kill_tree, labels_of, stream, tiny_shards
from nginx_server import Nginx, nginx_binary

pytestmark = pytest.mark.tier("unit")

TINY = "tiny/train-{000000..000003}.tar"  # 4 shards x 24 samples, label = index


@pytest.fixture(scope="module")
def web(tmp_path_factory, mnist_shards):
    """nginx serving tiny raw shards at /tiny/ and the session's MNIST shards at /mnist/."""
    if nginx_binary() is None:
        missing_prerequisite("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    root = tmp_path_factory.mktemp("www")
    tiny_shards(root / "tiny", n_shards=4, per_shard=24, encoding="raw")
    (root / "mnist").mkdir()
    for path in Path(mnist_shards).parent.iterdir():
        if path.suffix in (".tar", ".json"):
            (root / "mnist" / path.name).symlink_to(path)
    server = Nginx(root, tmp_path_factory.mktemp("nginx")).start()
    yield server
    server.close()


def manifest_of(web, folder: str = "tiny") -> dict:
    return json.loads((web.root / folder / SHARD_MANIFEST).read_text())


def plain(pattern, **overrides):
    return stream(pattern, workers=0, shuffle_buffer=0, batch_size=4, **overrides)


@pytest.mark.tier("e2e")  # the loader starts the pipe: command (curl, cat)
def test_http_and_curl_urls_read_what_local_files_hold(web):
    local = plain(str(web.root / TINY))
    expected = labels_of(local, local.budget)
    manifest = str(web.root / "tiny" / SHARD_MANIFEST)
    for pattern in (web.url(TINY), f"pipe:curl -s -f -L {web.url(TINY)}"):
        remote = plain(pattern, manifest=manifest)
        assert labels_of(remote, remote.budget) == expected, pattern
    assert {r.status for r in web.requests()} == {200}


def test_a_resume_over_http_starts_at_the_samples_byte_offset(web):
    local = plain(str(web.root / TINY))
    labels_of(local, 7)  # 28 samples in: the second shard of the epoch's order, its fifth sample
    before = len(web.requests())
    resumed = plain(web.url(TINY), manifest=str(web.root / "tiny" / SHARD_MANIFEST))
    resumed.load_state_dict(local.state_dict())
    assert labels_of(resumed, 10) == labels_of(local, 10)
    first = web.requests()[before]
    shard = next(e for e in manifest_of(web)["splits"]["train"]["shards"] if first.path.endswith(e["name"]))
    assert first.status == 206 and first.range == f"bytes={shard['offsets'][4]}-", first
    assert first.sent == shard["bytes"] - shard["offsets"][4]  # none of the 4 samples before it


def test_a_server_that_ignores_range_is_read_from_the_start(web):
    local = plain(str(web.root / TINY))
    labels_of(local, 7)
    before = len(web.requests())
    resumed = plain(web.url(TINY, "whole"), manifest=str(web.root / "tiny" / SHARD_MANIFEST))
    resumed.load_state_dict(local.state_dict())
    assert labels_of(resumed, 10) == labels_of(local, 10)
    first = web.requests()[before]
    assert first.status == 200 and first.range.startswith("bytes="), first  # asked, sent whole


def test_a_missing_shard_and_one_cut_off_mid_transfer_are_counted_and_named(web, caplog):
    (web.root / "gone").mkdir()
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar", SHARD_MANIFEST):
        (web.root / "gone" / name).symlink_to(web.root / "tiny" / name)  # no train-000003.tar: 404
    urls = [web.url("gone/train-000000.tar"), web.url("gone/train-000001.tar"),
            web.url("gone/train-000002.tar", "cut"), web.url("gone/train-000003.tar")]
    manifest = str(web.root / "tiny" / SHARD_MANIFEST)
    with caplog.at_level(logging.WARNING):
        s = plain("::".join(urls), manifest=manifest)
        labels = labels_of(s, s.budget)
    assert f"unreadable shard {urls[3]} after sample 0: HTTP Error 404: Not Found" in caplog.text
    assert re.search(rf"unreadable shard {re.escape(urls[2])} after sample \d+: ", caplog.text), caplog.text
    assert s.counters()["data_bad_shards"] == 2
    assert set(range(48)) <= set(labels) and not set(range(72, 96)) & set(labels)
    assert set(range(48, 60)) & set(labels)  # the part of the cut shard that arrived was used
    cut_or_gone = rf"shard ({re.escape(urls[2])}|{re.escape(urls[3])}) is unreadable: "
    with pytest.raises(DataError, match=cut_or_gone + r".*\(data\.strict|" + cut_or_gone):
        strict = plain("::".join(urls), manifest=manifest, strict=True)
        labels_of(strict, strict.budget)


@pytest.mark.tier("e2e")  # the loader starts the pipe: command (curl, cat)
@pytest.mark.parametrize("strict", [False, True])
def test_a_server_that_stops_mid_epoch_names_the_url(web, tmp_path, caplog, strict):
    server = Nginx(web.root, tmp_path / "nginx", slow_rate="16k").start()
    try:
        s = plain(server.url(TINY, "slow"), manifest=str(web.root / "tiny" / SHARD_MANIFEST), strict=strict)
        labels_of(s, 1)  # the first shard's transfer is under way (about 3 s at 16 KB/s)
        server.stop()
        with caplog.at_level(logging.WARNING), pytest.raises(DataError) as failed:
            labels_of(s, s.budget - 1)
    finally:
        server.close()
    url = re.escape(server.url("tiny/", "slow")) + r"train-00000\d\.tar"
    if strict:
        assert re.search(rf"shard {url} is unreadable: ", str(failed.value)), failed.value
    else:  # every shard goes on being tried, each failure named, until nothing of the share is readable
        assert re.search(rf"skipping the rest of unreadable shard {url} after sample \d+: ", caplog.text)
        assert "no readable sample in rank 0's share" in str(failed.value)


@pytest.mark.tier("cluster")
def test_two_processes_train_over_http_and_a_kill_9_resume_seeks_bit_exact(web, tmp_path, mnist_shards):
    """2 DDP processes x 2 loader workers read MNIST from nginx; killed by SIGKILL after the step-4
    checkpoint and resumed, they end with the weights of an uninterrupted run on the local files,
    and the resumed run's readers start with Range requests where the killed run's did not."""
    manifest = str(web.root / "mnist" / SHARD_MANIFEST)
    launch = [*CPU_DDP, "--num_processes", "2"]

    def args(run, shards, *more):
        return ["dist_gan.train", "configs/mnist_wgangp.yaml", f"--run.dir={run}", f"--data.shards={shards}",
                f"--data.manifest={manifest}", "--data.prepare_if_missing=false", "--data.workers=2",
                "--data.shuffle_buffer=100", *FAST,  # small blocks: step 4 lies past each reader's first
                "--run.log_every=1", "--run.ckpt_every=4", "--train.max_steps=8", *more]

    straight = tmp_path / "straight"
    run_cli(args(straight, mnist_shards), launch)
    http = web.url("mnist/train-{000000..000005}.tar")
    killed = tmp_path / "killed"
    seen: dict[str, object] = {}

    def kill_and_note_requests(proc):
        kill_tree(proc)
        seen["count"], seen["ranges"] = len(web.requests()), {r.range for r in web.requests()}

    kill_and_resume(args(killed, http), killed, launch=launch, kill_after=6, resumes_from=4, end=8,
                    kill=kill_and_note_requests)
    killed_requests, ranges_before = seen["count"], seen["ranges"]
    assert [r["step"] for r in read_metrics(killed) if r.get("event") == "start"] == [0, 4]
    assert_same_weights(straight / "checkpoints" / "step_00000008", killed / "checkpoints" / "step_00000008")
    resumed = web.requests()[killed_requests:]
    assert resumed and all(r.status in (200, 206) for r in resumed), resumed
    assert {r.range for r in resumed if r.status == 206} - ranges_before, resumed  # new start offsets
