"""Training-step throughput: the toolkit's step beside a plain PyTorch loop, same networks and loss.

    python bench/step_throughput.py --out=docs/step_throughput.md

For mnist_wgangp (28x28 grey, WGAN-GP, 5 critic steps) and dcgan64_rgb (64x64 RGB, non-saturating,
1 D step) at batch 64 and 256, every measurement runs in a fresh process that times the toolkit's
``train_step`` (Accelerate, autocast, loss registry, grad-norm hooks) and a plain loop written below
(no Accelerate) alternately, round by round, on the same in-memory batches; the ratio is toolkit
steps/s over plain steps/s from the same process. Then fp32 vs bf16 autocast (toolkit), and one
process vs two DDP processes over gloo (images/s summed over ranks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CONFIGS = ("mnist_wgangp", "dcgan64_rgb")


def load(name: str, batch: int, precision: str = "no", overrides: dict | None = None):
    from dist_gan.config import load_config

    return load_config(REPO / "configs" / f"{name}.yaml", {
        "data.batch_size": batch, "data.format": "memory", "train.mixed_precision": precision,
        **(overrides or {})})


def fake_data(config, rank: int = 0, world: int = 1, device: str | torch.device = "cpu"):
    """Random uint8 images kept on ``device`` (no loader, no host copies: the step alone is timed)."""
    from dist_gan.data import InMemoryBatches

    n = config.data.batch_size * world * 8
    shape = (n, config.data.channels, config.data.resolution, config.data.resolution)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return InMemoryBatches(images.to(device), torch.zeros(n, dtype=torch.long, device=device),
                           config.data.batch_size, 0, rank, world, device)


class PlainLoop:
    """The same GAN step written directly in PyTorch, as a user without the toolkit would."""

    def __init__(self, config):
        from dist_gan.models import build_discriminator, build_generator

        torch.manual_seed(0)
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.G = build_generator(config).to(self.device)
        self.D = build_discriminator(config).to(self.device)
        o = config.optim
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=o.g_lr, betas=o.betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=o.d_lr, betas=o.betas)
        self.data = fake_data(config, device=self.device)

    def d_loss(self, real, fake):
        if self.config.loss.name == "wgan_gp":
            alpha = torch.rand(len(real), 1, 1, 1, device=self.device)
            x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.D(x_hat).sum(), x_hat, create_graph=True)
            gp = (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()
            return self.D(fake).mean() - self.D(real).mean() + self.config.loss.gp_weight * gp
        return (torch.nn.functional.softplus(-self.D(real)).mean()
                + torch.nn.functional.softplus(self.D(fake)).mean())

    def g_loss(self, fake):
        if self.config.loss.name == "wgan_gp":
            return -self.D(fake).mean()
        return torch.nn.functional.softplus(-self.D(fake)).mean()

    def step(self) -> None:
        z_dim = self.config.model.z_dim
        for _ in range(self.config.optim.n_critic):
            real, _ = self.data.next_batch()
            with torch.no_grad():
                fake = self.G(torch.randn(len(real), z_dim, device=self.device))
            loss = self.d_loss(real, fake)
            self.opt_D.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_D.step()
        self.D.requires_grad_(False)
        z = torch.randn(self.config.data.batch_size, z_dim, device=self.device)
        loss = self.g_loss(self.G(z))
        self.opt_G.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_G.step()
        self.D.requires_grad_(True)


class Toolkit:
    def __init__(self, config, accelerator=None):
        from dist_gan.losses import build_loss
        from dist_gan.run.backend import make_accelerator, set_backend_flags
        from dist_gan.run.nets import build_nets

        self.config = config
        set_backend_flags(config.speed)
        self.accelerator = accelerator or make_accelerator(config)
        self.nets = build_nets(config, self.accelerator)
        self.loss = build_loss(config.loss, self.accelerator.autocast)
        self.data = fake_data(config, self.accelerator.process_index, self.accelerator.num_processes,
                              self.accelerator.device)
        self.count = 0

    def step(self) -> None:
        from dist_gan.run.step import train_step

        self.count += 1
        train_step(self.nets, self.loss, self.data, self.config,
                   measure=self.count % 10 == 0)  # as in training: grad norms on log steps


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds_per_step(runner, steps: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    sync()
    return (time.perf_counter() - start) / steps


def worker(args) -> None:
    """One measurement in this process; prints one JSON line."""
    config = load(args.config, args.batch, args.precision)
    runners = {"toolkit": Toolkit(config)}
    if args.plain:
        runners["plain"] = PlainLoop(config)
    for runner in runners.values():
        seconds_per_step(runner, 2)  # warm-up
    times = {name: [] for name in runners}
    for _ in range(args.rounds):  # alternate so drift on a shared machine hits both alike
        for name, runner in runners.items():
            times[name].append(seconds_per_step(runner, args.steps))
    rank = runners["toolkit"].accelerator.process_index
    world = runners["toolkit"].accelerator.num_processes
    if rank == 0:
        per_step = {name: statistics.median(t) for name, t in times.items()}
        images = config.data.batch_size * config.optim.n_critic * world
        print("RESULT " + json.dumps({
            "config": args.config, "batch": args.batch, "precision": args.precision, "world": world,
            **{f"{n}_steps_per_s": 1 / s for n, s in per_step.items()},
            "toolkit_imgs_per_s": images / per_step["toolkit"], "peak_mem_mb": peak_memory_mb(),
            "device": str(runners["toolkit"].accelerator.device),
            "distributed_type": str(runners["toolkit"].accelerator.distributed_type)}), flush=True)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by tensors on CUDA; the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(extra: list[str], launcher: list[str] | None = None) -> dict:
    cmd = (launcher or [sys.executable]) + [str(Path(__file__).resolve()), "--worker", *extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    line = next(text for text in out.stdout.splitlines() if text.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="mnist_wgangp")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="no")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu_matrix", action="store_true",
                        help="fp32/bf16/fp16 at batch 256 and 1024 plus DDP (NCCL) on one GPU")
    parser.add_argument("--batches", default="256,1024", help="--gpu_matrix batch sizes")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="--gpu_matrix configs")
    parser.add_argument("--precisions", default="no,bf16,fp16", help="--gpu_matrix precisions")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.gpu_matrix:
        return gpu_matrix(args)

    timing = ["--steps", str(args.steps), "--rounds", str(args.rounds)]
    rows = []
    for name in CONFIGS:
        for batch in (64, 256):
            r = measure(["--config", name, "--batch", str(batch), "--plain", *timing])
            rows.append(f"| {name} | {batch} | fp32 | 1 | {r['plain_steps_per_s']:.3f} | "
                        f"{r['toolkit_steps_per_s']:.3f} | {r['toolkit_steps_per_s'] / r['plain_steps_per_s']:.3f} | "
                        f"{r['toolkit_imgs_per_s']:,.0f} |")
        fp32 = measure(["--config", name, "--batch", "64", *timing])
        bf16 = measure(["--config", name, "--batch", "64", "--precision", "bf16", *timing])
        rows.append(f"| {name} | 64 | bf16 | 1 | | {bf16['toolkit_steps_per_s']:.3f} | "
                    f"{bf16['toolkit_steps_per_s'] / fp32['toolkit_steps_per_s']:.3f} vs fp32 | "
                    f"{bf16['toolkit_imgs_per_s']:,.0f} |")
        ddp = measure(["--config", name, "--batch", "64", *timing], launcher=[
            str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
            str(REPO / "launch" / "cpu_ddp.yaml")])
        rows.append(f"| {name} | 64 per rank | fp32 | 2 | | {ddp['toolkit_steps_per_s']:.3f} | "
                    f"{ddp['toolkit_imgs_per_s'] / fp32['toolkit_imgs_per_s']:.3f} img/s vs 1 process | "
                    f"{ddp['toolkit_imgs_per_s']:,.0f} |")
    table = "\n".join(["| config | batch | precision | processes | plain loop steps/s | toolkit steps/s | "
                       "ratio | toolkit real img/s |", "|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def gpu_matrix(args) -> None:
    """The GPU check's table: every config x batch x precision, then DDP over NCCL with one process."""
    timing = ["--steps", str(args.steps), "--rounds", str(args.rounds)]
    rows, results = [], []
    for name in args.configs.split(","):
        batches = [int(b) for b in args.batches.split(",")]
        for batch in batches:
            for precision in args.precisions.split(","):
                r = measure(["--config", name, "--batch", str(batch), "--precision", precision, *timing])
                results.append(r)
                rows.append(f"| {name} | {batch} | {precision} | 1 ({r['distributed_type']}) | "
                            f"{r['toolkit_steps_per_s']:.2f} | {r['toolkit_imgs_per_s']:,.0f} | "
                            f"{r['peak_mem_mb']:,.0f} |")
        r = measure(["--config", name, "--batch", str(batches[0]), *timing], launcher=[
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"])
        results.append(r)
        rows.append(f"| {name} | {batches[0]} | no | DDP 1 ({r['distributed_type']}) | "
                    f"{r['toolkit_steps_per_s']:.2f} | {r['toolkit_imgs_per_s']:,.0f} | "
                    f"{r['peak_mem_mb']:,.0f} |")
    table = "\n".join(["| config | batch | precision | processes | steps/s | real img/s | peak MB |",
                       "|---|---|---|---|---|---|---|", *rows])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
