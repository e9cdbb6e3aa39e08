"""The model families on a fixed CPU budget: train each for ``--minutes``, then evaluate and draw.

    python bench/families.py --mnist_dir=../shared/data/mnist --minutes=6 --out=docs

For configs/mnist_{cgan,vaegan,rnngan}.yaml (one process, data from shards): wall time and steps,
FID / KID / classifier IS / precision / recall / digits covered on 5,000 EMA samples against the
reference classifier's features (with the real-test floor), and for the conditional model how often
the reference classifier reads the requested digit. Writes OUT/families.{md,json} and the grids
OUT/family_<name>.png (cgan: one row per digit; vaegan: also family_vaegan_recon.png, test images
above their reconstructions). ``--families=rnngan`` re-measures one family and keeps the others'
figures from an earlier OUT/families.json (each row records its date).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

FAMILIES = ("cgan", "vaegan", "rnngan")


def train(name: str, run_dir: Path, args: argparse.Namespace) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dist_gan.train", f"configs/mnist_{name}.yaml", f"--run.dir={run_dir}",
           f"--data.mnist_dir={args.mnist_dir}", "--train.max_steps=1000000",
           f"--train.time_limit_min={args.minutes}", "--run.log_every=50", "--run.ckpt_every=1000000",
           "--run.sample_every=1000000"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.perf_counter() - start


def measure(name: str, run_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    from dist_gan.metrics.classifier import load_or_train_classifier
    from dist_gan.models.sampling import generate
    from dist_gan.tools.evaluation import evaluate_checkpoint
    from dist_gan.tools.generate import by_class, generator_from_checkpoint, reconstructions

    figures = evaluate_checkpoint(run_dir, args.n, mnist_dir=args.mnist_dir)
    generator, checkpoint = generator_from_checkpoint(run_dir)
    grid = out / f"family_{name}.png"
    if name == "cgan":
        images = by_class(generator, list(range(10)), 10, seed=1)
        classifier = load_or_train_classifier(args.mnist_dir)
        many = by_class(generator, list(range(10)), 200, seed=2)
        with torch.no_grad():
            predicted = classifier.embed(many)[1].argmax(1)
        figures["class_accuracy"] = (predicted == torch.arange(10).repeat_interleave(200)).float().mean().item()
        save_image(images, grid, nrow=10, normalize=True, value_range=(-1, 1))
    else:
        save_image(generate(generator, 64, seed=1), grid, nrow=8, normalize=True, value_range=(-1, 1))
    if name == "vaegan":
        save_image(reconstructions(checkpoint, generator, 32, args.mnist_dir), out / "family_vaegan_recon.png",
                   nrow=8, normalize=True, value_range=(-1, 1))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    figures["steps"] = [r for r in records if r.get("event") == "end"][-1]["step"]
    return figures


def report(results: dict, args: argparse.Namespace) -> str:
    floor = next(iter(results.values()))["real test (floor)"]
    lines = ["| family | measured | steps | minutes | FID | FID / floor | KID | IS | precision | recall | "
             "digits >= 5% | requested digit | samples |", "|" + "---|" * 13]
    lines.append(f"| real MNIST test (floor) | | | | {floor['fid']:.2f} | 1.00 | {floor['kid']:.2f} | "
                 f"{floor['is']:.2f} | {floor['precision']:.3f} | {floor['recall']:.3f} | "
                 f"{floor['classes_covered']:.0f} | | |")
    for name, r in results.items():
        g = r["generated"]
        accuracy = f"{r['class_accuracy']:.1%}" if "class_accuracy" in r else ""
        lines.append(f"| mnist_{name} | {r['date']} | {r['steps']} | {r['minutes']:.1f} | {g['fid']:.2f} | "
                     f"{g['fid'] / floor['fid']:.2f} | {g['kid']:.2f} | {g['is']:.2f} | "
                     f"{g['precision']:.3f} | {g['recall']:.3f} | {g['classes_covered']:.0f} | "
                     f"{accuracy} | ![{name}](family_{name}.png) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist_dir", required=True)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--runs", default="runs/families")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    out = Path(args.out)
    earlier = out / "families.json"
    results = json.loads(earlier.read_text()) if earlier.is_file() else {}
    for name in args.families.split(","):
        run_dir = REPO / args.runs / name
        seconds = train(name, run_dir, args)
        results[name] = {**measure(name, run_dir, out, args), "minutes": seconds / 60,
                         "date": time.strftime("%Y-%m-%d")}
    results = {name: results[name] for name in FAMILIES if name in results}
    table = report(results, args)
    print(table)
    (out / "families.md").write_text(table + "\n")
    (out / "families.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
