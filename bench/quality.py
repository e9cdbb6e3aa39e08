"""Sample quality against CPU time: train mnist_wgangp and mnist_dcgan for a fixed wall-clock budget
each, evaluating FID/KID/IS/coverage every few minutes, and write a report with a plot.

    python bench/quality.py --mnist_dir=../shared/data/mnist --minutes=25 --out=docs

Each config runs as its own `python -m dist_gan.train` process (one process, the machine's cores) with
`--train.time_limit_min`; evaluation uses 5,000 samples from the EMA generator against MNIST train, and
the floor is real MNIST test against train with the same number of samples. Writes
OUT/quality.md (a table), OUT/quality.json, OUT/quality.png (FID and IS against minutes and steps)
and OUT/quality_<config>.png (the final sample grids).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Evaluate roughly every 3 minutes at each config's CPU speed (steps/s measured on 2 cores).
EVAL_EVERY = {"mnist_dcgan": 1500, "mnist_wgangp": 300, "mnist_resnet": 400, "mnist_r3gan": 400}
TARGETS = {"is": 9.5, "fid_vs_floor": 2.0, "min_class_share": 0.05}


def run_config(name: str, args: argparse.Namespace, run_dir: Path) -> list[dict]:
    if not args.report_only:
        train(name, args, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "fid" in r]


def train(name: str, args: argparse.Namespace, run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dist_gan.train", f"configs/{name}.yaml", f"--run.dir={run_dir}",
           f"--data.mnist_dir={args.mnist_dir}", "--train.max_steps=1000000",
           f"--train.time_limit_min={args.minutes}", f"--eval.every={EVAL_EVERY[name]}",
           "--eval.n_samples=5000", "--run.log_every=50", "--run.ckpt_every=100000",
           "--run.sample_every=1500"]
    subprocess.run(cmd, cwd=REPO, check=True)


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
        minutes = [r["time_s"] / 60 for r in evals]
        steps = [r["step"] for r in evals]
        for col, x in enumerate((minutes, steps)):
            axes[0, col].plot(x, [r["fid"] for r in evals], marker="o", label=name)
            axes[1, col].plot(x, [r["is"] for r in evals], marker="o", label=name)
    for col, xlabel in enumerate(("wall-clock minutes (2 CPU cores)", "generator steps")):
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
    lines = ["| config | steps | minutes | FID | FID / floor | KID | IS | precision | recall | "
             "digits >= 5% | smallest digit share |", "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| real MNIST test (floor) | | | {fl['fid']:.2f} | 1.00 | {fl['kid']:.2f} | {fl['is']:.2f} | "
             f"{fl['precision']:.3f} | {fl['recall']:.3f} | {fl['classes_covered']} | {fl['min_class_share']:.3f} |"]
    for name, evals in results["runs"].items():
        r = evals[-1]
        lines.append(f"| {name} | {r['step']} | {r['time_s'] / 60:.1f} | {r['fid']:.2f} | "
                     f"{r['fid'] / fl['fid']:.2f} | {r['kid']:.2f} | {r['is']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['classes_covered']} | {r['min_class_share']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist_dir", required=True)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--configs", default="mnist_wgangp,mnist_dcgan")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--runs", default="runs/bench_quality")
    parser.add_argument("--report_only", action="store_true", help="rebuild the report from finished runs")
    parser.add_argument("--report_name", default="quality", help="OUT/<name>.{md,json,png}")
    args = parser.parse_args()
    out = Path(args.out)
    results = {"minutes": args.minutes, "floor": floor(args.mnist_dir), "runs": {}}
    for name in args.configs.split(","):
        run_dir = REPO / args.runs / name
        results["runs"][name] = run_config(name, args, run_dir)
        grids = sorted((run_dir / "samples").glob("*.png"))
        if grids:
            shutil.copy(grids[-1], out / f"quality_{name}.png")
        if (run_dir / "samples" / "ema_00001500.png").is_file():
            shutil.copy(run_dir / "samples" / "ema_00001500.png", out / f"{name}_1500.png")
    (out / f"{args.report_name}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"{args.report_name}.png")
    table = report(results)
    (out / f"{args.report_name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
