"""Did a change slow the training step? Two checkouts' own step benchmarks, alternated.

    git worktree add /tmp/before <REV>
    python bench/step_regression.py --before /tmp/before --after . [--repeats 3] [--out FILE]

Each checkout's ``bench/step_throughput.py --worker --plain`` runs in a fresh process and times that
checkout's ``train_step`` beside the plain PyTorch loop in the same process; the runs alternate
(before, after, before, ...) so machine drift hits both. Reported per config: the median of
toolkit/plain over the repeats for each checkout, and after/before of those ratios (1.00: no change;
the plain loop is the same code in both, so it cancels what the machine does meanwhile).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CONFIGS = ("mnist_wgangp", "dcgan64_rgb")


def measure(checkout: Path, config: str, steps: int, rounds: int) -> dict:
    cmd = [sys.executable, str(checkout / "bench" / "step_throughput.py"), "--worker", "--plain",
           "--config", config, "--steps", str(steps), "--rounds", str(rounds)]
    out = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, check=True)
    line = next(text for text in out.stdout.splitlines() if text.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, type=Path)
    parser.add_argument("--after", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    lines = ["| config | before: toolkit/plain | after: toolkit/plain | after/before | "
             "after toolkit steps/s |", "|---|---|---|---|---|"]
    for config in CONFIGS:
        ratios: dict[str, list[float]] = {"before": [], "after": []}
        speed = []
        for _ in range(args.repeats):
            for name in ("before", "after"):
                result = measure(getattr(args, name).resolve(), config, args.steps, args.rounds)
                ratios[name].append(result["toolkit_steps_per_s"] / result["plain_steps_per_s"])
                if name == "after":
                    speed.append(result["toolkit_steps_per_s"])
        before, after = statistics.median(ratios["before"]), statistics.median(ratios["after"])
        lines.append(f"| {config} | {before:.3f} | {after:.3f} | {after / before:.3f} | "
                     f"{statistics.median(speed):.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
