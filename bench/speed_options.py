"""Does each speed switch help? Every ``speed.*`` option (and the loader's pinning and prefetch) is
timed against the defaults with that one switch flipped, in the same process, round by round.

    python bench/speed_options.py --out=docs/speed_options.md [--mnist_dir=DIR for the loader rows]

Rows: torch.compile (G and D; the penalty's double backward stays eager), channels_last, Adam
for_loop / foreach / fused, zero_grad(set_to_none=False), TF32 and cuDNN autotuning (CUDA only), and,
given MNIST, the shard loader's images/s with prefetch 2 vs 4 vs 8 and (CUDA only) pinned memory.
The ratio is option steps/s over the baseline's, both medians of ``--rounds`` rounds. Compilation
happens in the warm-up and is reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from step_throughput import Toolkit, load, seconds_per_step  # noqa: E402

BASELINE = {"speed.compile": False, "speed.channels_last": False, "speed.adam_impl": "auto",
            "speed.zero_grad_set_to_none": True, "speed.tf32": False, "speed.cudnn_benchmark": False}
STEP_OPTIONS = {
    "compile": {"speed.compile": True},
    "channels_last": {"speed.channels_last": True},
    "adam_for_loop": {"speed.adam_impl": "for_loop"},
    "adam_foreach": {"speed.adam_impl": "foreach"},
    "adam_fused": {"speed.adam_impl": "fused"},
    "zero_grad_no_set_to_none": {"speed.zero_grad_set_to_none": False},
}
CUDA_OPTIONS = {"tf32": {"speed.tf32": True}, "cudnn_benchmark": {"speed.cudnn_benchmark": True}}


def compare(config_name: str, batch: int, precision: str, option: dict, steps: int,
            rounds: int) -> dict:
    """Baseline and ``option`` runners side by side: steps/s of each and the option's warm-up time."""
    base = Toolkit(load(config_name, batch, precision, BASELINE))
    other = Toolkit(load(config_name, batch, precision, {**BASELINE, **option}), base.accelerator)
    if option.get("speed.tf32") or option.get("speed.cudnn_benchmark"):
        # process-wide flags: set them around each runner's steps rather than once
        base.flags, other.flags = BASELINE, {**BASELINE, **option}
    seconds_per_step(base, 2)
    start = time.perf_counter()
    seconds_per_step(other, 2)
    warmup = time.perf_counter() - start
    times: dict[str, list[float]] = {"base": [], "option": []}
    for _ in range(rounds):
        for name, runner in (("base", base), ("option", other)):
            _apply_flags(runner)
            times[name].append(seconds_per_step(runner, steps))
    base_rate = 1 / statistics.median(times["base"])
    option_rate = 1 / statistics.median(times["option"])
    return {"base_steps_per_s": base_rate, "option_steps_per_s": option_rate,
            "ratio": option_rate / base_rate, "option_warmup_s": warmup}


def _apply_flags(runner) -> None:
    flags = getattr(runner, "flags", None)
    if flags:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = flags["speed.tf32"]
        torch.backends.cudnn.benchmark = flags["speed.cudnn_benchmark"]


def loader_rates(mnist_dir: str, batches: int) -> dict[str, float]:
    """Decoded img/s of the shard loader (2 workers) per prefetch factor, and pinned on CUDA."""
    from dist_gan.config import DataConfig
    from dist_gan.data import build_batch_stream, prepare_shards

    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = {f"prefetch {p}": {"prefetch_factor": p, "pin_memory": False} for p in (2, 4, 8)}
    if device == "cuda":
        variants["prefetch 4, pinned"] = {"prefetch_factor": 4, "pin_memory": True}
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepare_shards(DataConfig(mnist_dir=mnist_dir), Path(tmp), progress=False)
        for name, extra in variants.items():
            cfg = DataConfig(shards=f"{tmp}/train-{{000000..000005}}.tar", workers=2, batch_size=64,
                             prepare_if_missing=False, **extra)
            stream = build_batch_stream(cfg, seed=0, rank=0, world_size=1, device=device)
            for _ in range(10):
                stream.next_batch()
            start = time.perf_counter()
            for _ in range(batches):
                stream.next_batch()
            rates[name] = batches * 64 / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="mnist_wgangp,dcgan64_rgb")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="no")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--options", help="comma-separated subset of the option names")
    parser.add_argument("--mnist_dir", help="also measure the loader's prefetch/pinning")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--out")
    args = parser.parse_args()

    options = dict(STEP_OPTIONS, **(CUDA_OPTIONS if torch.cuda.is_available() else {}))
    if args.options:
        options = {k: v for k, v in options.items() if k in args.options.split(",")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, raw = [], {}
    for config_name in args.configs.split(","):
        for name, option in options.items():
            r = compare(config_name, args.batch, args.precision, option, args.steps, args.rounds)
            raw[f"{config_name}/{name}"] = r
            rows.append(f"| {config_name} | {name} | {r['base_steps_per_s']:.3f} | "
                        f"{r['option_steps_per_s']:.3f} | {r['ratio']:.3f} | {r['option_warmup_s']:.1f} |")
            print(rows[-1], flush=True)
    lines = [f"Device: {device}, batch {args.batch}, precision {args.precision}, torch {torch.__version__}.",
             "", "| config | option | baseline steps/s | option steps/s | ratio | option warm-up s |",
             "|---|---|---|---|---|---|", *rows]
    if args.mnist_dir:
        rates = loader_rates(args.mnist_dir, args.batches)
        raw["loader"] = rates
        first = next(iter(rates.values()))
        lines += ["", "| loader (2 workers, batch 64) | img/s | vs prefetch 2 |", "|---|---|---|"]
        lines += [f"| {name} | {rate:,.0f} | {rate / first:.3f} |" for name, rate in rates.items()]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
