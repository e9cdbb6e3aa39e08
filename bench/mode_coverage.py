"""Mode coverage on the field's own tables, at CPU scale, budgets in images seen (kimg).

    python bench/mode_coverage.py mixtures --kimg=512 --jobs=2              # grid25 + ring8, 3 seeds
    python bench/mode_coverage.py stacked --row=r3gan --kimg=100 --mnist_dir=../shared/data/mnist
    python bench/mode_coverage.py trend --kimg=4096 --evals=8              # one long grid25 run
    python bench/mode_coverage.py report                                   # tables only

- **mixtures**: PacGAN's Table 1 setting (``configs/grid25_gan.yaml``; ring8 the same networks):
  GAN (non-saturating), PacGAN4 (the same with ``model.discriminator.pack=4``) and the shipped
  R3GAN recipe (``configs/grid25_r3gan.yaml``: RpGAN + R1 + R2 every step), seeds 0-2 each;
  2,500 samples scored as PacGAN does (modes with a sample within 3 sigma, the share of such
  high-quality samples, KL of the mode histogram to uniform). Mean and spread (population standard
  deviation) over the seeds. ``--jobs=2`` trains two runs at a time, one CPU thread each.
- **stacked**: one StackedMNIST row per invocation (each takes up to ~30 minutes on 2 cores;
  ``--threads=1`` lets two invocations share them); 26,000 samples, each channel read by the
  reference MNIST classifier; the floor is 26,000 real test triples scored the same way.

Training is deterministic, so every figure is the same on any machine for the same kimg. Throughput
is a separate column, as a ratio against a baseline measured in the same invocation (mixtures: the
GAN row of the same mixture and seed; stacked: a short DCGAN run started first), since the machine's
speed varies. Results accumulate in docs/mode_coverage.json; every invocation rewrites the tables
in docs/mode_coverage.md and the marked section of docs/results.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEEDS = (0, 1, 2)
# id: (label, config, flags); the GAN rows are PacGAN's own setting, the R3GAN row the shipped recipe.
# PacGAN's batches are 100 packs of m points (m x 100 real points per step, 400 epochs for every m):
# "pacgan4" is that; "pacgan4_b100" keeps batch 100 (25 packs) to show what packing alone does.
MIXTURE_VARIANTS = {
    "gan": ("GAN (ns)", "grid25_gan", []),
    "pacgan4_b100": ("PacGAN4, batch 100 (25 packs of 4)", "grid25_gan", ["--model.discriminator.pack=4"]),
    "pacgan4": ("PacGAN4 as PacGAN (100 packs of 4: batch 400)", "grid25_gan",
                ["--model.discriminator.pack=4", "--data.batch_size=400"]),
    "r3gan": ("R3GAN (configs/grid25_r3gan.yaml)", "grid25_r3gan", []),
    # gamma scaled with the modes' variance: ring8's sigma is 5x smaller than grid25's, so 0.05 / 25
    "r3gan_gamma002": ("R3GAN, gamma 0.002 (grid25's scaled to ring8's sigma)", "grid25_r3gan",
                       ["--loss.r1_gamma=0.002", "--loss.r2_gamma=0.002"]),
}
STACKED_ROWS = {
    "dcgan": ("DCGAN (the seed's recipe)", "stacked_mnist_dcgan", []),
    "wgan_gp": ("WGAN-GP", "stacked_mnist_dcgan",
                ["--loss.name=wgan_gp", "--model.discriminator.norm=none", "--optim.betas=[0.0,0.9]",
                 "--optim.g_lr=1e-4", "--optim.d_lr=1e-4", "--optim.n_critic=5"]),
    "hinge_sn": ("hinge + spectral norm", "stacked_mnist_dcgan",
                 ["--loss.name=hinge", "--model.discriminator.norm=none",
                  "--model.discriminator.spectral_norm=true"]),
    "r3gan": ("R3GAN: RpGAN + R1 + R2, every step", "stacked_mnist_r3gan", []),
    "r3gan_r1_only": ("R3GAN ablation: RpGAN + R1 only", "stacked_mnist_r3gan", ["--loss.r2_gamma=0"]),
    "ns_r1_r2": ("R3GAN ablation: NS + R1 + R2", "stacked_mnist_r3gan", ["--loss.name=ns"]),
    "r3gan_lazy4": ("R3GAN ablation: RpGAN + R1 + R2, lazy every 4", "stacked_mnist_r3gan",
                    ["--loss.r1_every=4", "--loss.r2_every=4"]),
    "dcgan_pack2": ("DCGAN + PacGAN2 (pack 2)", "stacked_mnist_dcgan", ["--model.discriminator.pack=2"]),
}
# Published rows: (modes, KL) on StackedMNIST (R3GAN Table 3; PacGAN Table 2), and PacGAN's Table 1
# (modes of 25, high-quality share, reverse KL) on the 2-D grid.
PUBLISHED_STACKED = [("DCGAN (R3GAN Table 3)", "99", "3.40"), ("WGAN-GP (R3GAN Table 3)", "959", "0.73"),
                     ("PacGAN (R3GAN Table 3)", "992", "0.28"), ("StyleGAN2 (R3GAN Table 3)", "940", "0.42"),
                     ("PresGAN (R3GAN Table 3)", "1000", "0.12"), ("R3GAN (R3GAN Table 3)", "1000", "0.029"),
                     ("DCGAN, PacGAN's own (PacGAN Table 2)", "78.9 ± 6.46", "4.50 ± 0.127"),
                     ("PacDCGAN2 (PacGAN Table 2)", "1000.0 ± 0.00", "0.06 ± 0.003")]
# PacGAN Table 1: mean ± standard error over 10 trials
PUBLISHED_GRID = [("GAN", "17.3 ± 0.8", "94.8 ± 0.7 %", "0.70 ± 0.07"), ("PacGAN2", "23.8 ± 0.7", "91.3 ± 0.8 %", "0.13 ± 0.04"),
                  ("PacGAN3", "24.6 ± 0.4", "94.2 ± 0.4 %", "0.06 ± 0.02"), ("PacGAN4", "24.8 ± 0.2", "93.6 ± 0.6 %", "0.04 ± 0.01")]
PUBLISHED_RING = [("GAN", "6.3 ± 0.5", "98.2 ± 0.2 %", "0.45 ± 0.09"), ("PacGAN2", "7.9 ± 0.1", "95.6 ± 2.0 %", "0.07 ± 0.03"),
                  ("PacGAN3", "7.8 ± 0.1", "97.7 ± 0.3 %", "0.10 ± 0.02"), ("PacGAN4", "7.8 ± 0.1", "95.9 ± 1.4 %", "0.07 ± 0.02")]
RESULTS = REPO / "docs" / "mode_coverage.json"
SECTION = ("<!-- mode_coverage:start -->", "<!-- mode_coverage:end -->")


def steps_for(config: Path, extra: list[str], kimg: float) -> int:
    """G steps that show ``kimg`` thousand real images to D (batch x n_critic per step)."""
    from dist_gan.config import load_config
    from dist_gan.run.nets import real_images_per_step

    loaded = load_config(config, dict(flag[2:].split("=", 1) for flag in extra))
    return max(1, round(kimg * 1000 / real_images_per_step(loaded, 1)))


def train(config: str, extra: list[str], kimg: float, run_dir: Path, evals: int = 1, threads: int | None = None) -> dict:
    """Train ``config`` for ``kimg`` (evaluated ``evals`` times, the last at the end); the last
    evaluation's figures, the kimg and the training throughput in img/s. ``threads`` caps torch's
    CPU threads (OMP_NUM_THREADS) so that parallel runs do not compete for the same cores."""
    path = REPO / "configs" / f"{config}.yaml"
    steps = steps_for(path, extra, kimg)
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dist_gan.train", str(path), f"--run.dir={run_dir}",
           f"--train.max_steps={steps}", f"--eval.every={max(1, steps // evals)}", "--run.trackers=[]",
           f"--run.ckpt_every={steps}", f"--run.sample_every={max(1, steps // 4)}", *extra]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "modes" in r]
    rates = [r["imgs_per_sec"] for r in records if isinstance(r.get("imgs_per_sec"), (int, float))]
    return {**{k: evaluations[-1][k] for k in ("modes", "modes_kl", "mode_hit_share", "fid")},
            "curve": [(r["step"], r["modes"], r["modes_kl"], r["mode_hit_share"]) for r in evaluations],
            "kimg": kimg, "steps": steps, "img_s": statistics.median(rates) if rates else math.nan}


def stacked_floor(mnist_dir: str) -> dict:
    """26,000 real StackedMNIST test triples scored as the generated ones are."""
    from dist_gan.config import load_config
    from dist_gan.metrics.evaluator import Evaluator, figures, real_embeddings

    config = load_config(REPO / "configs" / "stacked_mnist_r3gan.yaml", {"data.mnist_dir": mnist_dir})
    evaluator = Evaluator(config)
    feats, logits = real_embeddings(config.data, "test", evaluator.embed)
    out = figures(evaluator.reference, evaluator.network, feats, logits, 0)
    return {k: out[k] for k in ("modes", "modes_kl", "mode_hit_share", "fid")}


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"mixtures": {}, "stacked": {}}


def save(update: Callable[[dict], None]) -> None:
    """Apply ``update`` to the results file as it is now, under a lock (another invocation may be
    adding rows)."""
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results()
        update(results)
        RESULTS.write_text(json.dumps(results, indent=1))


def run_mixtures(args: argparse.Namespace) -> None:
    """Every mixture x variant x seed, ``args.jobs`` runs at a time (one thread each)."""
    runs = [(source, key, seed) for source in args.sources for key in args.variants for seed in SEEDS]

    def one(source: str, key: str, seed: int) -> dict:
        _, config, flags = MIXTURE_VARIANTS[key]
        extra = [f"--data.source={source}", f"--run.seed={seed}", *flags]
        run_dir = Path(args.runs) / f"{source}_{key}_{seed}"
        return train(config, extra, args.kimg, run_dir, 4, threads=1 if args.jobs > 1 else args.threads)

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [(run, pool.submit(one, *run)) for run in runs]
        for (source, key, seed), future in futures:
            name, config, flags = MIXTURE_VARIANTS[key]
            row = {**future.result(), "config": config, "flags": flags}
            save(lambda results: results["mixtures"].setdefault(source, {}).setdefault(
                f"{key}@{args.kimg:g}", {}).update({str(seed): row}))
            print(f"{source} {name} seed {seed}: {row['modes']} modes, {row['mode_hit_share']:.3f} "
                  f"high quality, KL {number(row['modes_kl'])} ({row['img_s']:.0f} img/s)", flush=True)


def run_trend(args: argparse.Namespace) -> None:
    """One long grid25 run of the shipped R3GAN recipe (seed 0), evaluated ``args.evals`` times: how
    the figures move with the budget."""
    row = train("grid25_r3gan", [], args.kimg, Path(args.runs) / "grid25_trend", args.evals, threads=args.threads)
    save(lambda results: results.update({"trend": row}))


def run_stacked(args: argparse.Namespace) -> None:
    label, config, flags = STACKED_ROWS[args.row]
    extra = [f"--data.mnist_dir={args.mnist_dir}", *flags]
    baseline = train("stacked_mnist_dcgan", [f"--data.mnist_dir={args.mnist_dir}", "--eval.n_samples=1000"],
                     args.baseline_kimg, Path(args.runs) / f"stacked_baseline_{args.row}", threads=args.threads)
    run_dir = Path(args.runs) / f"stacked_{args.row}_{args.kimg:g}"
    row = train(config, extra, args.kimg, run_dir, args.evals, threads=args.threads)
    copy_last_grid(run_dir, REPO / "docs" / f"stacked_{args.row}_{args.kimg:g}kimg.png")
    row.update({"label": label, "config": config, "flags": flags, "baseline_img_s": baseline["img_s"]})
    floor = None if "floor" in load_results() else stacked_floor(args.mnist_dir)
    save(lambda results: results["stacked"].update({f"{args.row}@{args.kimg:g}": row}))
    if floor:
        save(lambda results: results.update({"floor": floor}))
    print(f"{label} at {args.kimg:g} kimg: {row['modes']} modes, KL {number(row['modes_kl'])} "
          f"({row['img_s']:.0f} img/s, {row['img_s'] / baseline['img_s']:.2f}x DCGAN)", flush=True)


def copy_last_grid(run_dir: Path, out: Path) -> None:
    """The run's last sample grid (EMA generator) beside the tables."""
    grids = sorted((run_dir / "samples").glob("ema_*.png"))
    if grids:
        shutil.copy(grids[-1], out)


def number(value: float | None) -> str:
    """A KL figure; None where no sample reached a mode (the KL over modes is undefined)."""
    return "undefined (no sample near a mode)" if value is None else f"{value:.3f}"


def spread(values: list[float | None]) -> str:
    """Mean ± population standard deviation, over the defined values (and how many were not)."""
    defined = [v for v in values if v is not None]
    if not defined:
        return "undefined"
    text = f"{statistics.mean(defined):.3g} ± {statistics.pstdev(defined):.2g}"
    return text if len(defined) == len(values) else f"{text} ({len(values) - len(defined)} undefined)"


def report(results: dict) -> str:
    lines = ["### StackedMNIST: modes of 1000 and KL(modes || uniform), 26,000 samples", "",
             "| recipe | kimg | modes | KL | FID (classifier features) | img/s (x DCGAN baseline) | command |",
             "|---|---|---|---|---|---|---|"]
    for key, row in sorted(results.get("stacked", {}).items(), key=lambda kv: (kv[1]["label"], kv[1]["kimg"])):
        ratio = row["img_s"] / row["baseline_img_s"]
        command = f"`bench/mode_coverage.py stacked --row={key.split('@')[0]} --kimg={row['kimg']:g}`"
        lines.append(f"| {row['label']} | {row['kimg']:g} | {row['modes']} | {number(row['modes_kl'])} | "
                     f"{row['fid']:.2f} | {row['img_s']:.0f} ({ratio:.2f}x) | {command} |")
    if "floor" in results:
        floor = results["floor"]
        lines.append(f"| *real test triples (the floor)* | - | {floor['modes']} | {floor['modes_kl']:.3f} | "
                     f"{floor['fid']:.2f} | - | |")
    lines += ["", "Published (6.4 Mimg or more of training; R3GAN Table 3, PacGAN Table 2):", "",
              "| model | modes | KL |", "|---|---|---|"]
    lines += [f"| {name} | {modes} | {kl} |" for name, modes, kl in PUBLISHED_STACKED]
    for source, published, total in (("grid25", PUBLISHED_GRID, 25), ("ring8", PUBLISHED_RING, 8)):
        rows = results.get("mixtures", {}).get(source, {})
        lines += ["", f"### {source}: modes of {total}, high-quality share, reverse KL (2,500 samples; mean ± "
                  f"spread over seeds {', '.join(map(str, SEEDS))})", "",
                  "| recipe | kimg | modes | high quality | reverse KL | img/s (x GAN at the same kimg) | command |",
                  "|---|---|---|---|---|---|---|"]
        order = list(MIXTURE_VARIANTS)
        for cell, seeds in sorted(rows.items(), key=lambda kv: (order.index(kv[0].split("@")[0]), float(kv[0].split("@")[1]))):
            key, kimg = cell.split("@")
            runs, base = list(seeds.values()), rows.get(f"gan@{kimg}", {})
            ratios = [seeds[s]["img_s"] / base[s]["img_s"] for s in seeds if s in base]
            ratio = f" ({statistics.mean(ratios):.2f}x)" if ratios else ""
            command = f"`mixtures --kimg={kimg} --variants={key} --sources={source}`"
            lines.append(f"| {MIXTURE_VARIANTS[key][0]} | {kimg} | {spread([r['modes'] for r in runs])} | "
                         f"{spread([100 * r['mode_hit_share'] for r in runs])} % | {spread([r['modes_kl'] for r in runs])} | "
                         f"{statistics.median(r['img_s'] for r in runs):.0f}{ratio} | {command} |")
        lines += ["", f"Published (PacGAN Table 1, {source}; 400 epochs of 100,000 points = 40 Mimg):", "",
                  "| model | modes | high quality | reverse KL |", "|---|---|---|---|"]
        lines += [f"| {name} | {modes} | {hq} | {kl} |" for name, modes, hq, kl in published]
    if "trend" in results:
        trend = results["trend"]
        per_step = trend["kimg"] / trend["steps"]
        lines += ["", f"### grid25 over a longer budget: configs/grid25_r3gan.yaml, seed 0, {trend['kimg']:g} kimg", "",
                  f"Command: `python bench/mode_coverage.py trend --kimg={trend['kimg']:g} --evals={len(trend['curve'])}`", "",
                  "| kimg | modes | high quality | reverse KL |", "|---|---|---|---|"]
        lines += [f"| {step * per_step:.0f} | {modes} | {100 * hit:.1f} % | {number(kl)} |"
                  for step, modes, kl, hit in trend["curve"]]
    return "\n".join(lines)


def write_report(results: dict) -> None:
    tables = report(results)
    (REPO / "docs" / "mode_coverage.md").write_text("# Mode coverage (bench/mode_coverage.py)\n\n" + __doc__.split("\n\n", 1)[1] + "\n" + tables + "\n")
    results_md = REPO / "docs" / "results.md"
    text = results_md.read_text()
    block = f"{SECTION[0]}\n{tables}\n{SECTION[1]}"
    if SECTION[0] in text:
        start, end = text.index(SECTION[0]), text.index(SECTION[1]) + len(SECTION[1])
        text = text[:start] + block + text[end:]
    else:
        text += "\n## Mode coverage: StackedMNIST and 2-D mixtures (issue 32)\n\n" + block + "\n"
    results_md.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["mixtures", "trend", "stacked", "report"])
    parser.add_argument("--kimg", type=float, default=100.0)
    parser.add_argument("--row", choices=sorted(STACKED_ROWS), default="r3gan")
    parser.add_argument("--mnist_dir", default=None)
    parser.add_argument("--sources", nargs="+", default=["grid25", "ring8"], choices=["grid25", "ring8"])
    parser.add_argument("--variants", nargs="+", default=list(MIXTURE_VARIANTS), choices=list(MIXTURE_VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="mixture runs at a time (one CPU thread each)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each run (with --jobs=1)")
    parser.add_argument("--evals", type=int, default=4, help="StackedMNIST evaluations along the run")
    parser.add_argument("--baseline_kimg", type=float, default=3.0)
    parser.add_argument("--runs", default="runs/bench_mode_coverage")
    args = parser.parse_args()
    if args.table == "mixtures":
        run_mixtures(args)
    elif args.table == "trend":
        run_trend(args)
    elif args.table == "stacked":
        if not args.mnist_dir:
            parser.error("stacked needs --mnist_dir (the MNIST IDX files)")
        run_stacked(args)
    write_report(load_results())


if __name__ == "__main__":
    main()
