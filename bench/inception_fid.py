"""Inception FID on CIFAR-10 (the GPU check's step 6): the floor (real test vs train) and a
cifar10_resnet (and --configs: cifar10_r3gan) models trained here for a few minutes, against train statistics.

    python -m dist_gan evaluate --reference=cifar10 --root=DIR --out=cifar10_train.npz --feature_weights=W
    python bench/inception_fid.py --reference cifar10_train.npz --root DIR --weights W --minutes 4

Needs the FID Inception weights file (``--weights``) and CIFAR-10's python batches under ``--root``;
neither can be fetched on a machine without internet. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train(config: str, run: Path, root: str, weights: str, reference: str, minutes: float,
          extra: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "dist_gan.train", f"configs/{config}.yaml", f"--run.dir={run}",
                    f"--data.root={root}", "--data.format=memory", "--train.mixed_precision=bf16",
                    "--train.max_steps=1000000", f"--train.time_limit_min={minutes}", "--run.log_every=50",
                    "--run.ckpt_every=1000000", "--eval.every=0", "--run.keep_best=false",
                    f"--eval.feature_weights={weights}", f"--eval.reference_stats={reference}", *extra],
                   cwd=REPO, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="CIFAR-10 train statistics (.npz)")
    parser.add_argument("--root", required=True, help="the directory holding cifar-10-batches-py")
    parser.add_argument("--weights", required=True, help="the FID Inception weights file")
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--run", default="/tmp/gpu_check/cifar10_fid")
    parser.add_argument("--extra", default="", help="more --key=value training overrides, space-separated")
    parser.add_argument("--configs", default="cifar10_resnet", help="comma-separated shipped CIFAR-10 configs")
    args = parser.parse_args()

    import torch

    from dist_gan.config import load_config
    from dist_gan.data.sources import DATA_SOURCES
    from dist_gan.metrics import Embedder, build_feature_net, load_reference, quality
    from dist_gan.metrics.evaluator import embed_image_set
    from dist_gan.tools.evaluation import evaluate_checkpoint

    config = load_config("configs/cifar10_resnet.yaml", {"data.root": args.root, "eval.feature_weights": args.weights})
    network = build_feature_net(config)
    reference = load_reference(args.reference, config, network)
    embed = Embedder(network, 250, "cuda" if torch.cuda.is_available() else "cpu")
    test_feats, test_logits = embed_image_set(DATA_SOURCES["cifar10"](config.data, "test"), embed)
    floor = quality(reference, test_feats[: args.n], test_logits[: args.n], data_classes=False)
    rows = []
    for name in args.configs.split(","):
        run = Path(args.run) / name
        train(name, run, args.root, args.weights, args.reference, args.minutes, args.extra.split())
        model = evaluate_checkpoint(run, args.n, reference_stats=args.reference,
                                    feature_weights=args.weights)["generated"]
        rows.append(f"| {name}, {args.minutes:g} min bf16 | {model['fid']:.2f} | {model['kid']:.4f} | {model['is']:.2f} |")
    print(f"| Inception FID, CIFAR-10 train statistics ({reference.count} images), {args.n} samples | FID | KID | IS |")
    print("|---|---|---|---|")
    print(f"| real test (floor) | {floor['fid']:.2f} | {floor['kid']:.4f} | {floor['is']:.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
