"""Sample quality per image seen: train each config for the same budget in kimg (thousands of real
images shown to D), evaluating FID/KID/IS/coverage along the way, and write a report with a plot.

    python bench/quality.py --mnist_dir=../shared/data/mnist --kimg=60 --jobs=2 \
        --configs=mnist_r3gan,mnist_resnet,mnist_dcgan --report_name=quality_kimg

Each config runs as its own `python -m dist_gan.train` process for the steps that make ``--kimg``
(batch x n_critic real images per step), so the figures are the same on any machine (training is
deterministic); ``--jobs`` runs that many at once, one CPU thread each. Throughput (img/s) is a
separate column, as a ratio against the first config, measured in the same invocation. Evaluation
uses 5,000 samples from the EMA generator against MNIST train, and the floor is real MNIST test
against train with the same number of samples. Writes OUT/<name>.md (a table), OUT/<name>.json,
OUT/<name>.png (FID and IS against kimg and minutes) and OUT/<name>_<config>.png (the final grids).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EVALS = 4  # evaluations along each run, the last at the end


def run_config(name: str, args: argparse.Namespace, run_dir: Path) -> list[dict]:
    if not args.report_only:
        train(name, args, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "fid" in r]


def variant(name: str) -> tuple[str, dict[str, str]]:
    """``CONFIG@key=value@...`` (a shipped config with overrides) as the config and its overrides."""
    config, *flags = name.split("@")
    return config, dict(flag.split("=", 1) for flag in flags)


def slug(name: str) -> str:
    """A variant's name as a file name."""
    return name.replace("@", "__").replace("=", "-")


def steps_for(name: str, kimg: float) -> int:
    """G steps that show ``kimg`` thousand real images to D in one process."""
    from dist_gan.config import load_config
    from dist_gan.run.nets import real_images_per_step

    config, overrides = variant(name)
    return max(1, round(kimg * 1000 / real_images_per_step(load_config(REPO / "configs" / f"{config}.yaml", overrides), 1)))


def train(name: str, args: argparse.Namespace, run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = steps_for(name, args.kimg)
    config, overrides = variant(name)
    cmd = [sys.executable, "-m", "dist_gan.train", f"configs/{config}.yaml", f"--run.dir={run_dir}",
           f"--data.mnist_dir={args.mnist_dir}", f"--train.max_steps={steps}",
           f"--eval.every={max(1, steps // EVALS)}", "--eval.n_samples=5000", "--run.log_every=50",
           f"--run.ckpt_every={steps}", f"--run.sample_every={max(1, steps // EVALS)}", "--run.trackers=[]",
           *(f"--{key}={value}" for key, value in overrides.items())]
    threads = 1 if args.jobs > 1 else args.threads
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run(cmd, cwd=REPO, check=True, env=env, stdout=subprocess.DEVNULL)


def throughput(run_dir: Path) -> float:
    """Median training img/s over the run's log windows."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["imgs_per_sec"] for r in records if isinstance(r.get("imgs_per_sec"), (int, float)))


def floor(mnist_dir: str) -> dict:
    from dist_gan.config import DataConfig
    from dist_gan.metrics import Embedder, load_or_train_classifier, quality, real_embeddings

    embed = Embedder(load_or_train_classifier(mnist_dir))
    data = DataConfig(mnist_dir=mnist_dir)
    train_feats, _ = real_embeddings(data, "train", embed)
    test_feats, test_logits = real_embeddings(data, "test", embed)
    return quality(train_feats, test_feats[:5000], test_logits[:5000])


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for name, evals in results["runs"].items():
        per_step = results["kimg"] / evals[-1]["step"]
        kimg = [r["step"] * per_step for r in evals]
        minutes = [r["time_s"] / 60 for r in evals]
        for col, x in enumerate((kimg, minutes)):
            axes[0, col].plot(x, [r["fid"] for r in evals], marker="o", label=name)
            axes[1, col].plot(x, [r["is"] for r in evals], marker="o", label=name)
    for col, xlabel in enumerate(("kimg (real images shown to D)", "wall-clock minutes (not comparable across machines)")):
        axes[0, col].axhline(results["floor"]["fid"], color="grey", ls="--", label="floor (real test)")
        axes[0, col].set_yscale("log")
        axes[1, col].axhline(results["floor"]["is"], color="grey", ls="--", label="floor (real test)")
        axes[1, col].set_xlabel(xlabel)
    axes[0, 0].set_ylabel("FID (classifier features, log)")
    axes[1, 0].set_ylabel("classifier Inception Score")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def report(results: dict) -> str:
    fl = results["floor"]
    lines = ["| config | kimg | steps | img/s (x first) | FID | FID / floor | KID | IS | precision | recall | "
             "digits >= 5% | smallest digit share |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| real MNIST test (floor) | | | | {fl['fid']:.2f} | 1.00 | {fl['kid']:.2f} | {fl['is']:.2f} | "
             f"{fl['precision']:.3f} | {fl['recall']:.3f} | {fl['classes_covered']} | {fl['min_class_share']:.3f} |"]
    first = next(iter(results["img_s"].values()))
    for name, evals in results["runs"].items():
        r, rate = evals[-1], results["img_s"][name]
        lines.append(f"| {name} | {results['kimg']:g} | {r['step']} | {rate:.0f} ({rate / first:.2f}x) | {r['fid']:.2f} | "
                     f"{r['fid'] / fl['fid']:.2f} | {r['kid']:.2f} | {r['is']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['classes_covered']} | {r['min_class_share']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist_dir", required=True)
    parser.add_argument("--kimg", type=float, default=60.0, help="budget of every config, in kimg")
    parser.add_argument("--jobs", type=int, default=1, help="configs trained at once (one CPU thread each)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each run when --jobs=1")
    parser.add_argument("--configs", default="mnist_r3gan,mnist_resnet,mnist_dcgan",
                        help="comma-separated; CONFIG@key=value@... trains a shipped config with overrides")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--runs", default="runs/bench_quality")
    parser.add_argument("--report_only", action="store_true", help="rebuild the report from finished runs")
    parser.add_argument("--report_name", default="quality", help="OUT/<name>.{md,json,png}")
    args = parser.parse_args()
    out = Path(args.out)
    results = {"kimg": args.kimg, "floor": floor(args.mnist_dir), "runs": {}, "img_s": {}}
    names = args.configs.split(",")
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = dict(zip(names, pool.map(lambda name: run_config(name, args, REPO / args.runs / slug(name)), names)))
    for name in names:
        run_dir = REPO / args.runs / slug(name)
        results["runs"][name], results["img_s"][name] = runs[name], throughput(run_dir)
        grids = sorted((run_dir / "samples").glob("*.png"))
        if grids:
            shutil.copy(grids[-1], out / f"{args.report_name}_{slug(name)}.png")
    (out / f"{args.report_name}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"{args.report_name}.png")
    table = report(results)
    (out / f"{args.report_name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
