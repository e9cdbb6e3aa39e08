"""What the per-file CRC-32 of a checkpoint costs: checksumming and verifying a ~100 MB checkpoint
against writing it, in one process.

    python bench/checkpoint_checksum.py [--mb 100] [--repeats 5]

A checkpoint-like folder (a model's weights in safetensors, an Adam state twice its size in
torch.save, a few small files) is written with fsync; then its files are checksummed (what a save
adds) and verified through ``read_manifest`` (what a load adds). Reported: median seconds and each
as a ratio to the write. The page cache is warm for the checksum passes (as right after a save).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_gan.core.fsutil import crc32_of
from dist_gan.run.checkpoint import MANIFEST, MANIFEST_FORMAT, read_manifest


def write_checkpoint(folder: Path, mb: int) -> None:
    n = mb * (1 << 20) // 4 // 3  # fp32 numbers: weights 1/3, Adam's two moments 2/3 of the bytes
    weights = {f"layer{i}.weight": torch.randn(n // 8) for i in range(8)}
    save_file(weights, folder / "model.safetensors")
    torch.save({"state": {i: {"exp_avg": w.clone(), "exp_avg_sq": w.clone()}
                          for i, w in enumerate(weights.values())}}, folder / "optimizer.bin")
    torch.save({"step": 1}, folder / "trainer_state.pt")
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"write": [], "checksum": [], "verify": []}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for _ in range(args.repeats):
            folder = Path(tmp) / "step_00000001"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            start = time.perf_counter()
            write_checkpoint(folder, args.mb)
            times["write"].append(time.perf_counter() - start)
            files = sorted(p for p in folder.iterdir() if p.is_file())
            start = time.perf_counter()
            crc = {p.name: crc32_of(p) for p in files}
            times["checksum"].append(time.perf_counter() - start)
            manifest = {"format": MANIFEST_FORMAT, "step": 1, "world_size": 1, "distributed_type": "NO",
                        "files": {p.name: p.stat().st_size for p in files}, "crc32": crc}
            (folder / MANIFEST).write_text(json.dumps(manifest))
            start = time.perf_counter()
            read_manifest(folder)
            times["verify"].append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in folder.iterdir()) / (1 << 20)
    write = statistics.median(times["write"])
    print(f"checkpoint of {size:.0f} MB, median of {args.repeats}")
    print("| step | seconds | vs write |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / write:.2f} |")


if __name__ == "__main__":
    main()
