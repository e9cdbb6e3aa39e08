"""Penalties that share D's forward (issue 26): the training step's img/s with
``speed.share_penalty_forward`` on (R1/R2 differentiate the loss's own D(real)/D(fake)) and off (each
penalty runs its own forward, as before), penalties due at every D update.

    python bench/shared_forward.py --mnist_dir=../shared/data/mnist [--steps=40 --rounds=2]

Each measurement is one `python -m dist_gan.train` process (one process, the machine's cores, MNIST
in memory, no evaluation); the img/s is the mean of the log windows after the first (warm-up). Both
settings run in the same invocation, interleaved (on, off, on, off), and are reported as a ratio.
Writes docs/shared_forward.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "mnist_resnet, R1 every step": ["configs/mnist_resnet.yaml", "--loss.r1_gamma=1.0", "--loss.r1_every=1"],
    "mnist_r3gan, R1 + R2 every step": ["configs/mnist_r3gan.yaml", "--loss.r1_every=1", "--loss.r2_every=1"],
}


def measure(recipe: list[str], shared: bool, steps: int, mnist_dir: str) -> float:
    run = Path(tempfile.mkdtemp(prefix="shared_forward_"))
    try:
        cmd = [sys.executable, "-m", "dist_gan.train", *recipe, f"--run.dir={run}", "--data.format=memory",
               f"--data.mnist_dir={mnist_dir}", f"--train.max_steps={steps}", "--run.log_every=10",
               "--run.sample_every=100000", "--run.ckpt_every=100000", "--run.trackers=[]",
               f"--speed.share_penalty_forward={str(shared).lower()}"]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        rates = [json.loads(line)["imgs_per_sec"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if '"imgs_per_sec"' in line]
        return statistics.mean(rates[1:])
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist_dir", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "docs"))
    args = parser.parse_args()
    results = {}
    for name, recipe in CONFIGS.items():
        rates = {True: [], False: []}
        for _ in range(args.rounds):
            for shared in (True, False):
                rates[shared].append(measure(recipe, shared, args.steps, args.mnist_dir))
                print(f"{name}: shared={shared} {rates[shared][-1]:.1f} img/s", flush=True)
        results[name] = {"shared": rates[True], "separate": rates[False],
                         "ratio": statistics.mean(rates[True]) / statistics.mean(rates[False])}
    lines = ["| config | shared forward img/s | separate forwards img/s | ratio |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {', '.join(f'{v:.1f}' for v in r['shared'])} | "
                     f"{', '.join(f'{v:.1f}' for v in r['separate'])} | {r['ratio']:.3f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    (out / "shared_forward.json").write_text(json.dumps(results, indent=1))
    (out / "shared_forward.md").write_text(
        "# Penalties that share D's forward\n\n"
        f"`python bench/shared_forward.py --mnist_dir=../shared/data/mnist --steps={args.steps} "
        f"--rounds={args.rounds}` on 2 CPU cores, one process per measurement, MNIST in memory, "
        "interleaved rounds. img/s counts real images D reads per second.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
