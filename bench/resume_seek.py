"""Resume-to-first-batch time at 10%, 50% and 90% of an epoch, on local files and over HTTP, and the
loader's rate over HTTP against local files.

    python bench/resume_seek.py --mnist_dir=../shared/data/mnist --out=docs/resume_seek.md

The data set is MNIST repeated 20 times (120 shards of 10,000: the 6 real shards linked 20 times
over, with a manifest listing all of them), 1.2M samples, read by one rank with 2 loader workers,
batch 64. nginx (Debian's package, on PATH or in /usr/sbin) serves the same files on a free localhost
port. For each position a fresh stream restored there (``load_state_dict``) delivers its first batch
(loader start-up included), best of 3:

- offsets: the manifest records each sample's byte offset, so each reader opens its shard there (a
  seek locally, a ``Range`` request over HTTP): what a resume does now;
- headers: the same manifest without offsets (as prepare wrote them before): each reader passes over
  the samples before its position by their tar headers (over HTTP it downloads them).

Then the loader's images/s (2 workers, after a warm-up), local files against HTTP, rounds interleaved.
Everything runs in this one invocation on the same files; the ratios are what matter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dist_gan.config import DataConfig  # noqa: E402
from dist_gan.data import build_batch_stream, prepare_shards  # noqa: E402
from dist_gan.data.shards import SHARD_MANIFEST  # noqa: E402

from nginx_server import Nginx  # noqa: E402

REPEATS, BATCH, WORKERS = 20, 64, 2


def repeated_shards(mnist_dir: str, root: Path) -> str:
    """MNIST's 6 shards linked ``REPEATS`` times over, with a manifest naming every copy."""
    real = root / "real"
    prepare_shards(DataConfig(mnist_dir=mnist_dir), real, "train", progress=False)
    manifest = json.loads((real / SHARD_MANIFEST).read_text())
    entries = manifest["splits"]["train"]["shards"]
    out, listed = root / "x20", []
    out.mkdir()
    for copy in range(REPEATS):
        for entry in entries:
            name = f"train-{copy * len(entries) + int(entry['name'][6:12]):06d}.tar"
            (out / name).symlink_to(real / entry["name"])
            listed.append({**entry, "name": name})
    manifest["splits"]["train"] = {"total": sum(e["count"] for e in listed), "skipped_unreadable": 0,
                                   "shards": listed}
    (out / SHARD_MANIFEST).write_text(json.dumps(manifest))
    return str(out / f"train-{{000000..{len(listed) - 1:06d}}}.tar")


NO_OFFSETS = "manifest_without_offsets.json"


def without_offsets(folder: Path) -> str:
    """A copy of ``folder``'s manifest with the sample offsets removed; its path."""
    manifest = json.loads((folder / SHARD_MANIFEST).read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        entry.pop("offsets", None)
    (folder / NO_OFFSETS).write_text(json.dumps(manifest))
    return str(folder / NO_OFFSETS)


def stream(pattern: str, manifest: str):
    cfg = DataConfig(shards=pattern, manifest=manifest, workers=WORKERS, batch_size=BATCH,
                     prepare_if_missing=False)
    return build_batch_stream(cfg, seed=0, rank=0, world_size=1, device="cpu")


def seek_seconds(pattern: str, manifest: str, position: int) -> float:
    s = stream(pattern, manifest)
    start = time.perf_counter()
    s.load_state_dict({"epoch": 0, "batch": position})
    s.next_batch()
    elapsed = time.perf_counter() - start
    s.close()
    return elapsed


def loader_rate(pattern: str, manifest: str, batches: int) -> float:
    s = stream(pattern, manifest)
    for _ in range(10):  # start the workers, fill the shuffle buffer
        s.next_batch()
    start = time.perf_counter()
    for _ in range(batches):
        s.next_batch()
    elapsed = time.perf_counter() - start
    s.close()
    return batches * BATCH / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist_dir", required=True)
    parser.add_argument("--batches", type=int, default=300, help="loader batches per throughput round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the tables as markdown here (and .json)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="resume_seek_"))
    server = None
    try:
        local = repeated_shards(args.mnist_dir, root)
        folder = Path(local).parent
        server = Nginx(folder, root / "nginx").start()
        http = server.url(Path(local).name)
        manifests = {"offsets": str(folder / SHARD_MANIFEST), "headers": without_offsets(folder)}
        sources = {"local": local, "HTTP": http}
        budget = stream(local, manifests["offsets"]).budget
        seeks = []
        for fraction in (0.1, 0.5, 0.9):
            position = int(fraction * budget)
            row = {"fraction": fraction, "batch": position}
            for where, pattern in sources.items():
                for how, manifest in manifests.items():
                    row[f"{where} {how}"] = min(seek_seconds(pattern, manifest, position) for _ in range(3))
            seeks.append(row)
            print(row, flush=True)
        rates = {where: [] for where in sources}
        for _ in range(args.rounds):
            for where, pattern in sources.items():
                rates[where].append(loader_rate(pattern, manifests["offsets"], args.batches))
        print(rates, flush=True)
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(root, ignore_errors=True)
    columns = [f"{where} {how}" for where in sources for how in manifests]
    lines = [f"MNIST x {REPEATS} ({REPEATS * 60000:,} samples, {REPEATS * 6} shards), batch {BATCH}, "
             f"{WORKERS} loader workers, one rank; {budget} batches per epoch. Seconds to the first "
             "batch after a restore, best of 3 (offsets: the reader opens its shard at its sample; "
             "headers: it passes over the samples before it).", "",
             "| position in the epoch | batch | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    lines += [f"| {r['fraction']:.0%} | {r['batch']} | " + " | ".join(f"{r[c]:.2f}" for c in columns) + " |"
              for r in seeks]
    median = {where: statistics.median(r) for where, r in rates.items()}
    lines += ["", f"| loader, {WORKERS} workers, batch {BATCH} | img/s (median of rounds) | rounds | vs local |",
              "|---|---|---|---|"]
    lines += [f"| {where} | {median[where]:,.0f} | {', '.join(f'{v:,.0f}' for v in r)} | "
              f"{median[where] / median['local']:.2f}x |" for where, r in rates.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"seek_seconds": seeks, "loader_img_per_s": rates,
                                                                   "batches": args.batches}, indent=1))


if __name__ == "__main__":
    main()
