"""What decoding costs the training step: PNG shards vs raw shards vs in-memory data.

    python bench/encoding.py --mnist_dir=../shared/data/mnist --out=docs/encoding.md

MNIST's training set is written twice (``prepare --encoding=png`` and ``--encoding=raw``). Then, in
this one process, with the cores shared as in training:

1. Loader rate: decoded images/s of the shard loader (2 workers, batch 64) per encoding, rounds
   interleaved.
2. End to end: mnist_wgangp's ``train_step`` (5 critic steps of batch 64 per step) drawing its batches
   from in-memory data (the same MNIST images), from the PNG shards and from the raw shards (2 loader
   workers each, as shipped), rounds interleaved; steps/s and the ratio to in-memory data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_gan.config import DataConfig, load_config  # noqa: E402
from dist_gan.data import InMemoryBatches, build_batch_stream, load_mnist_idx, prepare_shards  # noqa: E402

ENCODINGS = ("png", "raw")


def shard_stream(pattern: str, workers: int = 2, seed: int = 0):
    cfg = DataConfig(shards=pattern, workers=workers, batch_size=64, prepare_if_missing=False)
    return build_batch_stream(cfg, seed=seed, rank=0, world_size=1, device="cpu")


def loader_rate(stream, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        stream.next_batch()
    return batches * 64 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist_dir", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=400, help="loader batches per round")
    parser.add_argument("--steps", type=int, default=100, help="training steps per source per round")
    parser.add_argument("--out", help="write the table (markdown) and raw figures (json) here")
    args = parser.parse_args()

    from accelerate import Accelerator

    from dist_gan.losses import build_loss
    from dist_gan.run.nets import build_nets
    from dist_gan.run.step import train_step

    with tempfile.TemporaryDirectory() as tmp:
        patterns, sizes, write_s = {}, {}, {}
        for encoding in ENCODINGS:
            out = Path(tmp) / encoding
            start = time.perf_counter()
            prepare_shards(DataConfig(mnist_dir=args.mnist_dir, encoding=encoding), out, progress=False)
            write_s[encoding] = time.perf_counter() - start
            patterns[encoding] = str(out / "train-{000000..000005}.tar")
            sizes[encoding] = sum(p.stat().st_size for p in out.glob("train-*.tar"))

        loader = {e: [] for e in ENCODINGS}
        streams = {e: shard_stream(p, seed=1) for e, p in patterns.items()}
        for stream in streams.values():
            loader_rate(stream, 10)  # start the workers, fill the shuffle buffer
        for _ in range(args.rounds):
            for encoding, stream in streams.items():
                loader[encoding].append(loader_rate(stream, args.batches))
        for stream in streams.values():
            stream.close()

        config = load_config(REPO / "configs" / "mnist_wgangp.yaml", {"data.mnist_dir": args.mnist_dir})
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        nets = build_nets(config, accelerator)
        loss = build_loss(config.loss, accelerator.autocast)
        images, labels = load_mnist_idx(args.mnist_dir)
        sources = {"in memory": InMemoryBatches(images.unsqueeze(1), labels, 64, seed=0),
                   **{f"{e} shards": shard_stream(p) for e, p in patterns.items()}}
        for data in sources.values():
            for _ in range(3):  # warm up (and start the loader workers)
                train_step(nets, loss, data, config, measure=False)
        step_rates = {name: [] for name in sources}
        for _ in range(args.rounds):
            for name, data in sources.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    train_step(nets, loss, data, config, measure=False)
                step_rates[name].append(args.steps / (time.perf_counter() - start))
        for data in sources.values():
            data.close()

    median = {name: statistics.median(r) for name, r in step_rates.items()}
    lines = ["| encoding | shard bytes (MNIST train) | prepare | loader img/s (2 workers) |", "|---|---|---|---|"]
    lines += [f"| {e} | {sizes[e] / 1e6:,.1f} MB | {write_s[e]:.0f} s | "
              f"{statistics.median(loader[e]):,.0f} |" for e in ENCODINGS]
    lines += ["", "| mnist_wgangp steps drawing from | steps/s (median of rounds) | rounds | vs in memory |",
              "|---|---|---|---|"]
    lines += [f"| {name} | {median[name]:.3f} | {', '.join(f'{r:.3f}' for r in rates)} | "
              f"{median[name] / median['in memory']:.3f}x |" for name, rates in step_rates.items()]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"shard_bytes": sizes, "prepare_seconds": write_s, "loader_img_per_s": loader,
             "steps_per_s": step_rates, "steps": args.steps, "rounds": args.rounds,
             "torch_threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
