"""Throughput, parameters and FLOPs per image of each architecture at each resolution (issue 16).

    python bench/architectures.py --out=docs/architectures.md [--resolutions=32,64,128,256]

For each resolution it times the toolkit's ``train_step`` (one D step and one G step, the
non-saturating loss, fp32, data in memory) for dcgan (the baseline), resnet (the SNGAN/BigGAN nets
of configs/cifar10_resnet.yaml) and stylegan2 (configs/folder256_stylegan2.yaml's nets), all at
width 64 as the configs ship, alternating the three round by round in this one process, and reports
real images per second, the ratio to dcgan at the same resolution, parameters, and forward FLOPs per
image of G and D (``torch.utils.flop_counter.FlopCounterMode``). Regularisers (R1, path length) are
off so that the networks are compared; they add their own cost on the steps they are due.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from step_throughput import Toolkit, seconds_per_step  # noqa: E402

ARCHS = {
    "dcgan": {"model.generator.arch": "dcgan", "model.discriminator.arch": "dcgan",
              "model.generator.norm": "batch"},
    "resnet": {"model.generator.arch": "resnet", "model.discriminator.arch": "resnet",
               "model.generator.spectral_norm": True, "model.discriminator.spectral_norm": True},
    "stylegan2": {"model.generator.arch": "stylegan2", "model.discriminator.arch": "stylegan2",
                  "model.generator.mixing_prob": 0.9},
}


def config_for(arch: str, resolution: int, batch: int):
    from dist_gan.config import load_config

    return load_config(None, {
        **ARCHS[arch], "model.generator.width": 64, "model.discriminator.width": 64,
        "model.discriminator.norm": "none", "model.z_dim": 128, "loss.name": "ns", "optim.n_critic": 1,
        "data.source": "synthetic", "data.format": "memory", "data.resolution": resolution,
        "data.channels": 3, "data.batch_size": batch, "train.mixed_precision": "no"})


def flops_per_image(module: torch.nn.Module, *inputs: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # with autograd on: under no_grad a view of a parameter upsets the module tracker
        module(*inputs)
    return counter.get_total_flops() / inputs[0].shape[0]


def measure(resolution: int, batch: int, steps: int, rounds: int) -> list[dict]:
    runners = {arch: Toolkit(config_for(arch, resolution, batch)) for arch in ARCHS}
    for runner in runners.values():  # warm-up
        runner.step()
    times: dict[str, list[float]] = {arch: [] for arch in ARCHS}
    for _ in range(rounds):
        for arch, runner in runners.items():
            times[arch].append(seconds_per_step(runner, steps))
    rows = []
    base = batch / statistics.median(times["dcgan"])
    for arch, runner in runners.items():
        G, D = runner.nets.G.plain, runner.nets.D.plain
        G.eval()
        z = torch.randn(2, 128)
        g_flops = flops_per_image(G, z)
        d_flops = flops_per_image(D, G(z))
        G.train()
        img_s = batch / statistics.median(times[arch])
        rows.append({"arch": arch, "resolution": resolution, "batch": batch, "img_s": img_s,
                     "vs_dcgan": img_s / base, "G_params": sum(p.numel() for p in G.parameters()),
                     "D_params": sum(p.numel() for p in D.parameters()),
                     "G_flops": g_flops, "D_flops": d_flops})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| resolution | arch | batch | real img/s | vs dcgan | G params | D params | G fwd / image | "
             "D fwd / image |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['arch']} | {r['batch']} | {r['img_s']:.3g} | "
                     f"{r['vs_dcgan']:.2f} | {r['G_params'] / 1e6:.2f} M | {r['D_params'] / 1e6:.2f} M | "
                     f"{r['G_flops'] / 1e9:.2f} GFLOP | {r['D_flops'] / 1e9:.2f} GFLOP |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", default="32,64,128,256")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for resolution in (int(r) for r in args.resolutions.split(",")):
        batch = 16 if resolution <= 64 else 4
        rows += measure(resolution, batch, args.steps, args.rounds)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(
            f"Device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}, fp32.\n"
            f"Command: `python bench/architectures.py --resolutions={args.resolutions} --steps={args.steps} "
            f"--rounds={args.rounds} --out={args.out}`\n\n{text}\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
