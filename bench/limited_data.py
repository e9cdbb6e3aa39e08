"""Limited data: 2,000 MNIST training images, three ways to augment (or not), the same time each.

    python bench/limited_data.py --mnist_dir=../shared/data/mnist --minutes=24 --out=docs
    python bench/limited_data.py --mnist_dir=../shared/data/mnist --minutes=24 --out=docs \
        --config=mnist_r3gan --report_name=limited_data_r3gan

mnist_dcgan: no augmentation vs DiffAugment vs ADA. mnist_r3gan: no augmentation vs R3GAN's own way
(ADA's pipeline with p on a fixed cosine ramp 0 -> `--ramp_p` over `--ramp_kimg`, augment.target null)
vs ADA's tuning of p. The three runs of the config (in memory, `--data.limit=2000`) start together, one
process and one thread each, so on 2 cores each gets about 2/3 of a core for the same wall time; the
CPU-minutes each really used (from the OS) are reported. Every `--eval_every` steps the EMA
generator's FID is measured with the reference MNIST classifier against all 60,000 training images
(not only the 2,000 the runs see): over-fitting shows as FID rising again. The D(real) - D(fake) gap
comes from the logged logits. Writes OUT/limited_data.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from quality import floor  # noqa: E402  (bench/quality.py: real test vs train, the same classifier)


def variants(config: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """The three runs' extra flags, by name."""
    ada = ["--augment.kind=ada", "--augment.target=0.6", f"--augment.speed_kimg={args.ada_kimg}"]
    if config == "mnist_r3gan":
        ramp = f"{{start: 0, end: {args.ramp_p}, kimg: {args.ramp_kimg}, shape: cosine}}"
        return {"none": [], "r3gan_ramp": ["--augment.kind=ada", "--augment.target=null",
                                           f"--schedule.augment_p={ramp}"], "ada": ada}
    return {"none": [], "diffaugment": ["--augment.kind=diffaugment",
                                        "--augment.policy=color,translation,cutout"], "ada": ada}


def launch(name: str, extra: list[str], args: argparse.Namespace, run_dir: Path) -> subprocess.Popen:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dist_gan.train", f"configs/{args.config}.yaml", f"--run.dir={run_dir}",
           f"--data.mnist_dir={args.mnist_dir}", "--data.format=memory", f"--data.limit={args.limit}",
           "--train.max_steps=1000000", f"--train.time_limit_min={args.minutes}",
           f"--eval.every={args.eval_every}", "--eval.n_samples=5000", "--run.log_every=50",
           "--run.ckpt_every=100000", "--run.sample_every=100000", *extra]
    log = open(run_dir.parent / f"{name}.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def cpu_minutes(proc: subprocess.Popen) -> float:
    """Wait for ``proc``; the user + system CPU time it and its children used, in minutes."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (usage.ru_utime + usage.ru_stime) / 60


def read_run(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if "D_real" in r]
    return {"evals": [r for r in records if "fid" in r],
            "logs": [{k: r.get(k) for k in ("step", "time_s", "kimg", "D_real", "D_fake", "D_real_sign",
                                            "augment_p")} for r in logs]}


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, run in results["runs"].items():
        evals, logs = run["evals"], run["logs"]
        axes[0].plot([r["time_s"] / 60 for r in evals], [r["fid"] for r in evals], marker="o", label=name)
        axes[1].plot([r["time_s"] / 60 for r in logs], [r["D_real"] - r["D_fake"] for r in logs], label=name)
        if name != "none":
            axes[2].plot([r["time_s"] / 60 for r in logs], [r["augment_p"] for r in logs], label=f"{name} p")
            axes[2].plot([r["time_s"] / 60 for r in logs], [r["D_real_sign"] for r in logs],
                         label=f"{name} r_t = E[sign D(real)]", alpha=0.6)
    axes[0].axhline(results["floor"]["fid"], color="grey", ls="--", label="floor (real test)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("FID vs all 60k train images (classifier features, log)")
    axes[1].set_ylabel("D(real) - D(fake) (mean logits)")
    axes[2].axhline(0.6, color="grey", ls=":", label="target 0.6")
    for ax in axes:
        ax.set_xlabel("wall-clock minutes (3 runs sharing 2 CPU cores)")
        ax.legend()
    fig.suptitle(f"{results['config']}, {results['limit']} MNIST training images: "
                 + " vs ".join(results["runs"]))
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def report(results: dict) -> str:
    fl = results["floor"]["fid"]
    lines = ["| augmentation | steps | kimg | CPU-min | best FID (step) | final FID | final / best | "
             "final D(real)-D(fake) | final r_t | final p |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        evals, last = run["evals"], run["logs"][-1]
        best = min(evals, key=lambda r: r["fid"])
        final = evals[-1]
        p = f"{last['augment_p']:.3f}" if last.get("augment_p") is not None else "-"
        lines.append(f"| {name} | {final['step']} | {last['kimg']:.0f} | {run['cpu_minutes']:.1f} | "
                     f"{best['fid']:.2f} ({best['step']}) | {final['fid']:.2f} | "
                     f"{final['fid'] / best['fid']:.2f} | {last['D_real'] - last['D_fake']:.2f} | "
                     f"{last['D_real_sign']:.2f} | {p} |")
    lines.append(f"\nFloor (real MNIST test vs train, 5,000 samples): FID {fl:.2f}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist_dir", required=True)
    parser.add_argument("--minutes", type=float, default=24.0)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--eval_every", type=int, default=400)
    parser.add_argument("--ada_kimg", type=float, default=50.0,
                        help="augment.speed_kimg: ADA's 500 scaled to a run of ~1%% of ADA's length")
    parser.add_argument("--config", default="mnist_dcgan", choices=["mnist_dcgan", "mnist_r3gan"])
    parser.add_argument("--ramp_p", type=float, default=0.55, help="mnist_r3gan: the ramp's end (CIFAR-10's)")
    parser.add_argument("--ramp_kimg", type=float, default=50.0, help="mnist_r3gan: the ramp's length")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--report_name", default="limited_data", help="OUT/<name>.{md,json,png}")
    parser.add_argument("--runs", default="runs/bench_limited_data")
    parser.add_argument("--report_only", action="store_true", help="rebuild the report from finished runs")
    args = parser.parse_args()
    out, runs, runs_of = Path(args.out), REPO / args.runs, variants(args.config, args)
    runs.mkdir(parents=True, exist_ok=True)
    cpu, reference = {}, floor(args.mnist_dir)  # first: trains and caches the classifier once
    if not args.report_only:
        started = time.time()
        procs = {name: launch(name, extra, args, runs / name) for name, extra in runs_of.items()}
        for name, proc in procs.items():
            cpu[name] = cpu_minutes(proc)
            if proc.returncode != 0:
                sys.exit(f"{name} failed (exit {proc.returncode}): see {runs / (name + '.log')}")
        (runs / "cpu_minutes.json").write_text(json.dumps({"cpu": cpu, "wall_s": time.time() - started}))
    cpu = json.loads((runs / "cpu_minutes.json").read_text())["cpu"]
    results = {"config": args.config, "limit": args.limit, "minutes": args.minutes,
               "ada_kimg": args.ada_kimg, "floor": reference, "variants": runs_of, "runs": {}}
    for name in runs_of:
        results["runs"][name] = {**read_run(runs / name), "cpu_minutes": cpu[name]}
    (out / f"{args.report_name}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"{args.report_name}.png")
    table = report(results)
    (out / f"{args.report_name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
