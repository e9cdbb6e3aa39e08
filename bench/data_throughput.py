"""Is the shard loader fast enough, and does its memory stay flat as the dataset grows?

    python bench/data_throughput.py --mnist_dir=../shared/data/mnist --out=docs/data_throughput.md

1. Decoded images/s of the shard loader with 0, 1 and 2 worker processes (batch 64, one rank).
2. Beside it, the rate at which mnist_wgangp's training step consumes real images (D sees
   batch_size x n_critic per step), measured in the same invocation on in-memory batches.
   loader rate / consumption rate > 1 means the loader is not the bottleneck.
3. Peak RSS (the process plus its loader workers) streaming the shards once versus the same shards
   listed five times over (5x the samples): memory must not grow with the dataset (within 10%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_gan.config import DataConfig, load_config  # noqa: E402
from dist_gan.data import build_batch_stream, prepare_shards  # noqa: E402


def loader_rate(pattern: str, workers: int, batches: int) -> float:
    cfg = DataConfig(shards=pattern, workers=workers, batch_size=64, prepare_if_missing=False)
    stream = build_batch_stream(cfg, seed=0, rank=0, world_size=1, device="cpu")
    for _ in range(10):  # start the workers, fill the shuffle buffer
        stream.next_batch()
    start = time.perf_counter()
    for _ in range(batches):
        stream.next_batch()
    return batches * 64 / (time.perf_counter() - start)


def training_consumption_rate(mnist_dir: str, steps: int) -> float:
    """Real images per second that mnist_wgangp's step consumes (data already in memory)."""
    from accelerate import Accelerator

    from dist_gan.data import InMemoryBatches
    from dist_gan.losses import build_loss
    from dist_gan.run.nets import build_nets
    from dist_gan.run.step import train_step

    config = load_config(REPO / "configs" / "mnist_wgangp.yaml", {"data.mnist_dir": mnist_dir})
    accelerator = Accelerator(cpu=True)
    nets = build_nets(config, accelerator)
    loss = build_loss(config.loss, accelerator.autocast)
    images = torch.randint(0, 256, (4096, 1, 28, 28), dtype=torch.uint8)
    data = InMemoryBatches(images, torch.zeros(4096, dtype=torch.long), config.data.batch_size, seed=0)
    for _ in range(3):
        train_step(nets, loss, data, config, measure=False)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(nets, loss, data, config, measure=False)
    return steps * config.data.batch_size * config.optim.n_critic / (time.perf_counter() - start)


def peak_rss_mb(pattern: str) -> float:
    """Stream one full epoch of ``pattern`` in a fresh process; its and its workers' peak RSS in MB."""
    code = f"""
import resource, sys
sys.path.insert(0, {str(REPO)!r})
from dist_gan.config import DataConfig
from dist_gan.data import build_batch_stream
s = build_batch_stream(DataConfig(shards={pattern!r}, workers=2, batch_size=64,
                                  prepare_if_missing=False), 0, 0, 1, "cpu")
for _ in range(s.budget):
    s.next_batch()
s._batches = None  # let the workers exit so their peak is counted
import gc; gc.collect()
me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(max(me, kids) / 1024, s.budget)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist_dir", required=True)
    parser.add_argument("--shards", help="existing MNIST shard directory (default: write to a temp dir)")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="write the table (markdown) and raw figures (json) here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(args.shards or tmp)
        if not args.shards:
            prepare_shards(DataConfig(mnist_dir=args.mnist_dir), shard_dir, progress=False)
        once = str(shard_dir / "train-{000000..000005}.tar")
        rates = {w: loader_rate(once, w, args.batches) for w in (0, 1, 2)}
        consume = training_consumption_rate(args.mnist_dir, args.steps)
        rss_once, rss_five = peak_rss_mb(once), peak_rss_mb("::".join([once] * 5))

    lines = ["| measure | value | vs training consumption |", "|---|---|---|"]
    lines += [f"| loader, {w} worker(s) | {r:,.0f} img/s | {r / consume:.2f}x |" for w, r in rates.items()]
    lines += [f"| mnist_wgangp training step consumes | {consume:,.0f} img/s | 1.00x |",
              f"| peak RSS, shards once (60k samples) | {rss_once:,.0f} MB | |",
              f"| peak RSS, shards x5 (300k samples) | {rss_five:,.0f} MB | ratio {rss_five / rss_once:.3f} |"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"loader_img_per_s": rates, "training_img_per_s": consume, "peak_rss_mb_once": rss_once,
             "peak_rss_mb_five": rss_five, "torch_threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
