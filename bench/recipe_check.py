"""Train a shipped recipe for a few minutes on synthetic data at its own resolution and report real
images per second, peak GPU memory and model FLOPs utilisation (the GPU check's step 5).

    python bench/recipe_check.py configs/cifar10_resnet.yaml --minutes=2 --precision=bf16 --peak_tflops=989

MFU = training FLOPs per second / the device's peak (``--peak_tflops``: dense bf16, 989 on an
H100/H200). Training FLOPs per real image are counted, not modelled: one D step and its share of the
G step run once under ``torch.utils.flop_counter.FlopCounterMode`` (forward and backward, the
regularisers switched off), divided by the real images that step consumed. Prints one table row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def training_flops_per_image(config_path: str, overrides: dict) -> float:
    import torch
    from step_throughput import Toolkit
    from torch.utils.flop_counter import FlopCounterMode

    from dist_gan.config import load_config

    config = load_config(config_path, {**overrides, "data.batch_size": 4, "train.mixed_precision": "no",
                                       "loss.r1_gamma": 0.0, "loss.r2_gamma": 0.0, "loss.pl_weight": 0.0,
                                       "schedule.r1_gamma": None, "schedule.r2_gamma": None,
                                       "optim.accumulate": 1})
    runner = Toolkit(config)
    runner.step()  # warm-up, outside the count
    counter = FlopCounterMode(display=False)
    with counter:
        runner.step()
    real_images = config.data.batch_size * config.optim.n_critic * config.optim.accumulate
    del torch
    return counter.get_total_flops() / real_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--run_dir", default="/tmp/recipe_check")
    parser.add_argument("--log_every", type=int, default=20, help="steps per logged img/s figure")
    parser.add_argument("--extra", default="", help="more --key=value overrides, space-separated")
    args = parser.parse_args()
    name = Path(args.config).stem
    run = Path(args.run_dir) / name
    overrides = {"data.source": "synthetic", "data.format": "memory", "data.folder": None}
    cli = [f"--{k}={'null' if v is None else v}" for k, v in overrides.items()] + args.extra.split()
    subprocess.run([sys.executable, "-m", "dist_gan.train", args.config, f"--run.dir={run}", *cli,
                    f"--train.mixed_precision={args.precision}", "--train.max_steps=1000000",
                    f"--train.time_limit_min={args.minutes}", f"--run.log_every={args.log_every}", "--run.ckpt_every=1000000",
                    "--run.sample_every=1000000", "--eval.every=0", "--run.keep_best=false"],
                   cwd=REPO, check=True)
    logs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "imgs_per_sec" in r]
    img_s = sum(r["imgs_per_sec"] for r in logs[len(logs) // 2:]) / max(len(logs[len(logs) // 2:]), 1)
    memory = max((r.get("gpu_mem_peak_gb", 0.0) for r in logs), default=0.0)
    flops = training_flops_per_image(args.config, {**overrides, **dict(
        kv.lstrip("-").split("=", 1) for kv in args.extra.split() if "=" in kv)})
    mfu = img_s * flops / (args.peak_tflops * 1e12)
    print(f"| {name} | {args.precision} | {logs[-1]['step'] if logs else 0} steps | {img_s:,.1f} real img/s | "
          f"{memory:.1f} GB peak | {flops / 1e9:.1f} GFLOP per real image | MFU {mfu:.1%} |")


if __name__ == "__main__":
    main()
