"""Resume-to-first-batch time: seeking the data position versus replaying the epoch up to it.

    python bench/resume_seek.py --mnist_dir=../shared/data/mnist --out=docs/resume_seek.md

The data set is MNIST repeated 20 times (120 shards of 10,000: the 6 real shards linked 20 times
over, with a manifest listing all of them), 1.2M samples, read by one rank with 2 loader workers,
batch 64. For positions 0%, 10% and 90% through an epoch:

- seek: a fresh stream restored at that position (``load_state_dict``) delivers its first batch
  (loader start-up included): what a resumed run waits for now;
- replay: a fresh stream reads and decodes every batch up to the position, then one more: what
  resuming cost before (the old loader discarded that many batches).

Both are measured in this invocation on the same files; the ratio is what matters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_gan.config import DataConfig  # noqa: E402
from dist_gan.data import build_batch_stream, prepare_shards  # noqa: E402
from dist_gan.data.shards import SHARD_MANIFEST  # noqa: E402

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


def stream(pattern: str):
    cfg = DataConfig(shards=pattern, workers=WORKERS, batch_size=BATCH, prepare_if_missing=False)
    return build_batch_stream(cfg, seed=0, rank=0, world_size=1, device="cpu")


def seek_seconds(pattern: str, position: int) -> float:
    s = stream(pattern)
    start = time.perf_counter()
    s.load_state_dict({"epoch": 0, "batch": position})
    s.next_batch()
    elapsed = time.perf_counter() - start
    s.close()
    return elapsed


def replay_seconds(pattern: str, position: int) -> float:
    s = stream(pattern)
    start = time.perf_counter()
    for _ in range(position + 1):
        s.next_batch()
    elapsed = time.perf_counter() - start
    s.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist_dir", required=True)
    parser.add_argument("--out", default=None, help="write the table as markdown here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="resume_seek_"))
    try:
        pattern = repeated_shards(args.mnist_dir, root)
        budget = stream(pattern).budget
        rows = []
        for fraction in (0.0, 0.1, 0.9):
            position = int(fraction * budget)
            seek = min(seek_seconds(pattern, position) for _ in range(3))
            replay = replay_seconds(pattern, position)
            rows.append((fraction, position, seek, replay))
            print(f"{fraction:.0%}: batch {position}/{budget}: seek {seek:.2f} s, replay {replay:.1f} s",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = [f"MNIST x {REPEATS} ({REPEATS * 60000:,} samples, {REPEATS * 6} shards), batch {BATCH}, "
             f"{WORKERS} loader workers, one rank; {budget} batches per epoch.", "",
             "| position in the epoch | batch | seek: first batch (s, best of 3) | replay to it (s) | replay / seek |",
             "|---|---|---|---|---|"]
    lines += [f"| {f:.0%} | {p} | {s:.2f} | {r:.1f} | {r / s:.0f}x |" for f, p, s, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
