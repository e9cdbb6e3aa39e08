"""Typed run configuration: YAML plus dotted command-line overrides, validated when loaded.

A config is a tree of dataclasses. ``load_config(path, {"train.max_steps": 200})`` reads the YAML,
applies the overrides, converts every value to its field's type and checks ranges, so a bad value
fails before any process group or network is built, with a message that names the key. Names that
registries define (losses, networks, data sources) are checked against ``names`` when given
(``dist_gan.run.registry.registered_names()``, as the entry points do), and again by ``lookup`` where
each registry is used. This module imports nothing of the package: it is the ground floor.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional, TypeVar

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the value."""


T = TypeVar("T")


def _not_one_of(value: Any, names: Collection[str]) -> str:
    close = difflib.get_close_matches(str(value), list(names), n=1, cutoff=0.5)
    return f"is not one of {sorted(names)}" + (f"; did you mean {close[0]!r}?" if close else "")


def lookup(registry: Mapping[str, T], key: str, value: str) -> T:
    """``registry[value]``, or a ConfigError naming the config ``key`` and the known names."""
    if value not in registry:
        raise ConfigError(f"{key} = {value!r}: {_not_one_of(value, registry)}")
    return registry[value]


TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    sample_every: int = 200
    ckpt_every: int = 500
    keep_last: int = 3
    # a fresh run (train.resume unset) in a run.dir holding another run's checkpoints is refused;
    # true deletes that run's checkpoints and metrics.jsonl first
    overwrite: bool = False
    # with eval.every: keep the checkpoint of the lowest FID so far in checkpoints/best (never pruned)
    keep_best: bool = False
    sample_truncation: Optional[float] = None  # truncation of the sample grids (see dist-gan sample)
    # Accelerate's trackers to report to (metrics.jsonl is always written): tensorboard, wandb, mlflow,
    # aim, comet_ml, clearml, dvclive, swanlab, trackio; several at once, e.g. [tensorboard, wandb].
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])

    def problems(self) -> list[tuple[str, Any, str]]:
        found: list[tuple[str, Any, str]] = []
        for name in ("log_every", "sample_every", "ckpt_every", "keep_last"):
            if getattr(self, name) < 1:
                found.append((name, getattr(self, name), "must be >= 1"))
        if self.sample_truncation is not None and not self.sample_truncation > 0:
            found.append(("sample_truncation", self.sample_truncation, "must be > 0 (null: off)"))
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown:
            found.append(("trackers", self.trackers, f"{unknown} not among {list(TRACKERS)}"))
        if not self.dir:
            found.append(("dir", self.dir, "must name a directory"))
        elif Path(self.dir).exists() and not Path(self.dir).is_dir():
            found.append(("dir", self.dir, "names a file, not a directory"))
        return found


DEFAULT_SHARDS = "data/mnist/train-{000000..000005}.tar"


# The 2-D mixtures (dist_gan.data.mixtures defines them): samples are points held as (2, 1, 1)
POINT_SOURCES = ("ring8", "grid25")
POINT_SHAPE = (2, 1, 1)


@dataclass
class DataConfig:
    # the dataset: mnist | cifar10 | folder | stacked_mnist | synthetic (see dist_gan.data.sources), or
    # a 2-D mixture of Gaussians, ring8 | grid25 (dist_gan.data.mixtures: resolution 1, channels 2,
    # format memory)
    source: str = "mnist"
    # shards: stream WebDataset tar shards (the default); memory: load the whole source into memory.
    format: Literal["shards", "memory"] = "shards"
    # Brace pattern or URLs (local paths, file://, pipe:...), several patterns joined by "::".
    shards: str = DEFAULT_SHARDS
    # A folder of images to train on directly: rank 0 writes shards from it (beside the run, in
    # run.dir/shards, or where data.shards points when set) the first time and whenever the folder
    # changed; later runs reuse them. Sets data.source=folder and data.root to it.
    folder: Optional[str] = None
    manifest: Optional[str] = None  # default: manifest.json beside the first (local) shard
    prepare_if_missing: bool = True  # rank 0 writes the shards from `source` if none exist yet
    shard_size: int = 10000  # samples per shard when preparing
    # How prepared shards store images: raw (uint8 bytes: no decoding), png (lossless, smaller),
    # jpg (lossy, smallest); auto: raw up to 64x64 RGB, png above.
    encoding: Literal["auto", "raw", "png", "jpg"] = "auto"
    workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # samples; 0 or 1 disables the in-stream shuffle
    resampled: bool = False  # draw shards with replacement (very large sets) instead of epochs
    strict: bool = False  # a bad sample or shard is an error instead of a warning and a skip
    # Directory holding the four MNIST IDX files (gzipped or not). Unset: torchvision downloads into root.
    mnist_dir: Optional[str] = None
    root: str = "data"  # torchvision download directory, or the image folder for source=folder
    resolution: int = 28
    channels: int = 1  # 1 (grey) or 3 (RGB); 2 for the 2-D mixtures' points
    batch_size: int = 64  # per process
    pin_memory: Optional[bool] = None  # page-locked host batches for async copies; None: on CUDA only
    prefetch_factor: int = 4  # batches each loader worker reads ahead
    # Horizontal flips of the data set: every image is shown mirrored in alternate epochs (which
    # epoch first is drawn per image), so any two epochs hold the doubled set. Off for digits.
    xflip: bool = False
    # Train on this many images of the source (a seeded subset, the same for every run and seed);
    # 0: all. Read into memory (data.format: memory) or written by `python -m dist_gan.data prepare
    # --limit=N`. For stacked_mnist and the 2-D mixtures, the size of their fixed set (0: the
    # protocols' 128,000 and 100,000).
    limit: int = 0
    # A symbolic link in an image folder whose target lies outside the folder is skipped (with a
    # warning) unless this is true: a folder from elsewhere could otherwise point the run at any file.
    follow_symlinks: bool = False
    # Seconds a shard source may send nothing before the read fails (counted like a cut-off shard,
    # the command or URL named): http(s):// shards and pipe: commands.
    read_timeout_s: float = 60.0

    def as_read(self) -> "DataConfig":
        """This config as its images are read: ``folder`` names the source (folder) and its root,
        so evaluation measures against the images the run trains on."""
        return dataclasses.replace(self, source="folder", root=self.folder) if self.folder else self

    def problems(self) -> list[tuple[str, Any, str]]:
        found: list[tuple[str, Any, str]] = []
        if self.read_timeout_s <= 0:
            found.append(("read_timeout_s", self.read_timeout_s, "must be > 0"))
        points = self.source in POINT_SOURCES
        for name, low in (("batch_size", 1), ("resolution", 1 if points else 8), ("shard_size", 1),
                          ("workers", 0), ("shuffle_buffer", 0), ("prefetch_factor", 1), ("limit", 0)):
            if getattr(self, name) < low:
                found.append((name, getattr(self, name), f"must be >= {low}"))
        if points:
            channels, size = POINT_SHAPE[:2]
            for name, want in (("channels", channels), ("resolution", size), ("format", "memory")):
                if getattr(self, name) != want:
                    found.append((name, getattr(self, name), f"must be {want!r} for data.source="
                                  f"{self.source} (2-D points, held as {channels} channels of {size} px)"))
        elif self.channels not in (1, 3):
            found.append(("channels", self.channels, "must be 1 (grey) or 3 (RGB)"))
        if self.limit and self.format == "shards" and self.source != "stacked_mnist":  # its set's size
            found.append(("limit", self.limit, "applies to data.format: memory; for shards, write a "
                          "limited set with `python -m dist_gan.data prepare --limit=N` and point "
                          "data.shards at it"))
        if self.format == "shards" and not self.shards:
            found.append(("shards", self.shards, "must name the shards when data.format is shards"))
        return found


@dataclass
class NetConfig:
    arch: str = "dcgan"  # a name in models.GENERATORS / DISCRIMINATORS / ENCODERS ("none": no encoder)
    width: int = 64  # channels of the widest (dcgan) or first hidden (mlp) layer's unit; rnn: hidden/4
    norm: Literal["batch", "layer", "instance", "none"] = "none"
    spectral_norm: bool = False
    cell: Literal["gru", "lstm"] = "gru"  # rnn only
    mbstd: bool = False  # discriminators: the minibatch standard-deviation feature (Improved-GAN)
    # resnet: channels = width x one multiplier per doubling, smallest map first (empty: by resolution)
    channel_mult: list[int] = field(default_factory=list)
    attention_res: int = 0  # resnet: a self-attention block at this map size (0: none)
    init: Literal["orthogonal", "normal", "xavier"] = "orthogonal"  # resnet weight initialisation
    shared_dim: int = 128  # conditional resnet G: size of the class embedding shared by all blocks
    mapping_layers: int = 8  # stylegan2 G: depth of the mapping network z -> w
    mapping_lr_mult: float = 0.01  # stylegan2 G: the mapping network's learning-rate multiplier
    mixing_prob: float = 0.9  # stylegan2 G: probability of style mixing regularisation per batch
    # r3gan: channels per stage, smallest map first (empty: `width` at each stage up to 32 px, halved
    # per stage after the fourth above), residual blocks per stage (empty: 2 each), channels per group
    # of the 3x3 convs, and the blocks' inverted-bottleneck expansion ratio
    widths: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    group_size: int = 16
    expansion: int = 2
    # discriminators: PacGAN's packing, D judges this many samples at once (joined along channels;
    # each batch is split into groups of it), all real or all fake. 1: one sample at a time.
    pack: int = 1
    # discriminators: Freeze-D (Mo et al. 2020), the first this many blocks from the input keep the
    # weights they start with (from train.init_from when fine-tuning), excluded from the optimiser
    freeze: int = 0

    def problems(self) -> list[tuple[str, Any, str]]:
        found: list[tuple[str, Any, str]] = [("width", self.width, "must be >= 1")] if self.width < 1 else []
        if self.pack < 1:
            found.append(("pack", self.pack, "must be >= 1 (1: no packing)"))
        if self.freeze < 0:
            found.append(("freeze", self.freeze, "must be >= 0 (0: every block trains)"))
        for name in ("widths", "blocks"):
            if any(v < 1 for v in getattr(self, name)):
                found.append((name, getattr(self, name), "entries must be >= 1"))
        for name in ("group_size", "expansion"):
            if getattr(self, name) < 1:
                found.append((name, getattr(self, name), "must be >= 1"))
        if any(m < 1 for m in self.channel_mult):
            found.append(("channel_mult", self.channel_mult, "entries must be >= 1"))
        if not 0.0 <= self.mixing_prob <= 1.0:
            found.append(("mixing_prob", self.mixing_prob, "must be in [0, 1]"))
        if self.mapping_layers < 1:
            found.append(("mapping_layers", self.mapping_layers, "must be >= 1"))
        if self.mapping_lr_mult <= 0:
            found.append(("mapping_lr_mult", self.mapping_lr_mult, "must be > 0"))
        return found


@dataclass
class ModelConfig:
    z_dim: int = 128
    # > 0: class-conditional G (label embedding) and projection D, trained on the data's labels
    num_classes: int = 0
    generator: NetConfig = field(default_factory=lambda: NetConfig(norm="batch"))
    discriminator: NetConfig = field(default_factory=NetConfig)
    # VAE-GAN: an encoder trained with G (arch "dcgan"); "none" for a plain GAN
    encoder: NetConfig = field(default_factory=lambda: NetConfig(arch="none"))

    def problems(self) -> list[tuple[str, Any, str]]:
        found: list[tuple[str, Any, str]] = [("z_dim", self.z_dim, "must be >= 1")] if self.z_dim < 1 else []
        if self.num_classes < 0:
            found.append(("num_classes", self.num_classes, "must be >= 0 (0: unconditional)"))
        if self.generator.mbstd:
            found.append(("generator.mbstd", True, "is a discriminator layer"))
        for name in ("generator", "encoder"):
            if getattr(self, name).pack != 1:
                found.append((f"{name}.pack", getattr(self, name).pack, "packs a discriminator's input"))
            if getattr(self, name).freeze != 0:
                found.append((f"{name}.freeze", getattr(self, name).freeze, "freezes a discriminator's blocks"))
        pack = self.discriminator.pack
        if pack > 1 and self.num_classes:
            found.append(("discriminator.pack", pack, "packs unconditional samples; a conditional D "
                          f"(model.num_classes={self.num_classes}) judges each sample with its label"))
        if pack > 1 and self.encoder.arch != "none":
            found.append(("discriminator.pack", pack, "a VAE-GAN compares D's features per sample"))
        return found


@dataclass
class LossConfig:
    name: str = "wgan_gp"
    gp_weight: float = 10.0  # wgan_gp only
    r1_gamma: float = 0.0  # R1 penalty on real data, any loss; 0 disables
    r1_every: int = 1  # lazy R1: computed every this many D updates, weighted by it (StyleGAN2: 16)
    # R2 (R3GAN): the zero-centred penalty on fake data, weight r2_gamma / 2, every r2_every D updates
    r2_gamma: float = 0.0
    r2_every: int = 1
    clip_value: float = 0.01  # wgan (weight clipping) only
    # StyleGAN2's path length regularisation (model.generator.arch stylegan2): weight (0: off),
    # interval in G updates (lazy, weighted by it), batch divisor and running-mean decay
    pl_weight: float = 0.0
    pl_every: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    # Improved-GAN techniques (Salimans et al. 2016), usable with any family:
    label_smoothing: float = 0.0  # one-sided: D's target for real images is 1 - this (ns loss only)
    feature_matching: float = 0.0  # weight of ||E f(x) - E f(G(z))||^2 on D's features, added to G's loss
    historical_averaging: float = 0.0  # weight of ||theta - running mean of theta||^2, both nets
    # VAE-GAN (model.encoder set): weights of the KL prior term and of the reconstruction error
    # measured in D's last hidden layer (Larsen et al. 2016)
    kl_weight: float = 1.0
    recon_weight: float = 1.0

    def problems(self) -> list[tuple[str, Any, str]]:
        found: list[tuple[str, Any, str]] = []
        for name in ("gp_weight", "r1_gamma", "r2_gamma", "feature_matching", "historical_averaging", "kl_weight",
                     "recon_weight"):
            if getattr(self, name) < 0:
                found.append((name, getattr(self, name), "must be >= 0"))
        if self.clip_value <= 0:
            found.append(("clip_value", self.clip_value, "must be > 0"))
        for name in ("r1_every", "r2_every"):
            if getattr(self, name) < 1:
                found.append((name, getattr(self, name), "must be >= 1"))
        if self.pl_weight < 0:
            found.append(("pl_weight", self.pl_weight, "must be >= 0"))
        for name in ("pl_every", "pl_batch_shrink"):
            if getattr(self, name) < 1:
                found.append((name, getattr(self, name), "must be >= 1"))
        if not 0.0 < self.pl_decay <= 1.0:
            found.append(("pl_decay", self.pl_decay, "must be in (0, 1]"))
        if not 0.0 <= self.label_smoothing < 1.0:
            found.append(("label_smoothing", self.label_smoothing, "must be in [0, 1)"))
        elif self.label_smoothing > 0 and self.name != "ns":
            found.append(("label_smoothing", self.label_smoothing,
                          f"needs the ns loss (a target probability); loss.name is {self.name}"))
        return found


@dataclass
class OptimConfig:
    g_lr: float = 1e-4
    d_lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.9)
    n_critic: int = 5  # discriminator steps per generator step
    grad_clip: float = 0.0  # max gradient norm for both nets; 0 disables
    lr_schedule: Literal["constant", "linear"] = "constant"  # linear: decays to 0 at train.max_steps
    # Micro-batches of data.batch_size per update of either net (gradients summed, DDP syncing on
    # the last only): the effective batch is batch_size x processes x accumulate.
    accumulate: int = 1

    def problems(self) -> list[tuple[str, Any, str]]:
        found: list[tuple[str, Any, str]] = []
        if self.accumulate < 1:
            found.append(("accumulate", self.accumulate, "must be >= 1"))
        for name in ("g_lr", "d_lr"):
            if getattr(self, name) <= 0:
                found.append((name, getattr(self, name), "must be > 0"))
        if not all(0.0 <= b < 1.0 for b in self.betas):
            found.append(("betas", list(self.betas), "each beta must be in [0, 1)"))
        if self.n_critic < 1:
            found.append(("n_critic", self.n_critic, "must be >= 1"))
        if self.grad_clip < 0:
            found.append(("grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)"))
        return found


@dataclass
class SpeedConfig:
    """Switches that change speed, not results (up to float rounding). docs/performance.md has the
    measurements behind each default."""

    # torch.compile G and D (penalties' double backward stays eager). Off: +4% on CPU, for ~30 s of
    # compilation per process start.
    compile: bool = False
    # NHWC memory format for the conv nets (+9-11% on CPU); ignored under DeepSpeed (needs NCHW)
    channels_last: bool = True
    adam_impl: Literal["auto", "for_loop", "foreach", "fused"] = "auto"  # auto: torch's choice
    zero_grad_set_to_none: bool = True  # drop gradients instead of zero-filling them
    tf32: bool = True  # TF32 matmuls and convolutions on Ampere+ GPUs (no effect on CPU)
    cudnn_benchmark: bool = True  # let cuDNN time its kernels for the (fixed) shapes (CUDA only)
    # Fix DDP's gradient buckets when the nets are wrapped, so the all-reduce sums every gradient in
    # the same order before and after a resume (bit-exact resume at 3+ processes). False: DDP
    # re-buckets by gradient order after its first step (more comm/compute overlap for big nets on
    # many GPUs; a resumed run then matches only to float rounding).
    ddp_fixed_buckets: bool = True
    # Zero-centred penalties (R1, R2) differentiate the loss's own D forward (StyleGAN2-ADA's "Dboth");
    # false: each penalty runs a forward of its own (the cost of each: bench/shared_forward.py).
    # When a penalty is due, the shared forward runs in fp32 with autocast off.
    share_penalty_forward: bool = True

    def problems(self) -> list[tuple[str, Any, str]]:
        return []


@dataclass
class TrainConfig:
    max_steps: int = 1000  # generator steps
    # null: as the launcher says (accelerate launch --mixed_precision, or the profile), else "no"
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    # EMA of the generator's weights: half-life in thousands of images (global batch x accumulate
    # per step), so a config averages alike on 1 or 64 processes; ramped up to at most ema_rampup x
    # the images seen (null: no ramp). 0 disables. ema_decay (per step, ramped as min(decay,
    # (1+step)/(10+step))) replaces it when set; ema_decay 0 also disables.
    ema_kimg: float = 10.0
    ema_rampup: Optional[float] = 0.05
    ema_decay: Optional[float] = None
    # None: start fresh; "auto": newest checkpoint in run.dir if any; otherwise a checkpoint directory.
    resume: Optional[str] = None
    # Stop (with the final sample, eval and checkpoint) at the first log step after this many minutes
    # of this process's training; 0: no limit. For fixed-budget comparisons and job time limits.
    time_limit_min: float = 0.0
    # Divergence guard: an update whose loss or gradient is NaN/inf is skipped and counted; after
    # max_bad_steps bad steps in a row the run stops (naming the step and loss) or rolls back to its
    # last checkpoint with the learning rates times rollback_lr_scale. skip_nonfinite=false turns
    # the guard off (then a non-finite logged value stops the run at the next log step).
    skip_nonfinite: bool = True
    max_bad_steps: int = 5
    on_divergence: Literal["stop", "rollback"] = "stop"
    rollback_lr_scale: float = 0.5
    max_rollbacks: int = 3

    def problems(self) -> list[tuple[str, Any, str]]:
        found: list[tuple[str, Any, str]] = []
        if self.max_steps < 1:
            found.append(("max_steps", self.max_steps, "must be >= 1"))
        if self.max_bad_steps < 1:
            found.append(("max_bad_steps", self.max_bad_steps, "must be >= 1"))
        if not 0.0 < self.rollback_lr_scale <= 1.0:
            found.append(("rollback_lr_scale", self.rollback_lr_scale, "must be in (0, 1]"))
        if self.max_rollbacks < 0:
            found.append(("max_rollbacks", self.max_rollbacks, "must be >= 0"))
        if self.time_limit_min < 0:
            found.append(("time_limit_min", self.time_limit_min, "must be >= 0 (0: no limit)"))
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            found.append(("ema_decay", self.ema_decay, "must be in [0, 1), or null to use ema_kimg"))
        if self.ema_kimg < 0:
            found.append(("ema_kimg", self.ema_kimg, "must be >= 0 (0: no EMA)"))
        if self.ema_rampup is not None and self.ema_rampup <= 0:
            found.append(("ema_rampup", self.ema_rampup, "must be > 0, or null for no ramp"))
        return found


AUGMENT_POLICIES = {"diffaugment": ("color", "translation", "cutout"), "ada": ("blit", "geom", "color")}


@dataclass
class AugmentConfig:
    """Differentiable augmentation of every image D sees (real, fake and the penalties' inputs)."""

    # none | diffaugment (Zhao et al. 2020) | ada (Karras et al. 2020, adaptive p)
    kind: Literal["none", "diffaugment", "ada"] = "none"
    # The groups, a list or comma-separated. diffaugment: color, translation, cutout; ada: blit,
    # geom, color. Empty: all of the kind's groups.
    policy: list[str] = field(default_factory=list)
    # Probability of each transform per image. diffaugment: fixed (the paper: 1). ada: the start
    # value, then tuned towards `target` (fixed when target is null).
    p: Optional[float] = None
    target: Optional[float] = 0.6  # ada: the aim for r_t = E[sign(D(real))]; null: p stays fixed
    speed_kimg: float = 500.0  # ada: thousands of real images for p to move 0 -> 1 at most

    def groups(self) -> list[str]:
        default = AUGMENT_POLICIES.get(self.kind, ())
        return list(self.policy) if self.policy else list(default)

    def start_p(self) -> float:
        return self.p if self.p is not None else (1.0 if self.kind == "diffaugment" else 0.0)

    def problems(self) -> list[tuple[str, Any, str]]:
        found: list[tuple[str, Any, str]] = []
        if self.kind != "none":
            allowed = AUGMENT_POLICIES[self.kind]
            unknown = [g for g in self.groups() if g not in allowed]
            if unknown or not self.groups():
                found.append(("policy", self.policy, f"{self.kind} groups are {list(allowed)}"))
        if self.p is not None and not 0.0 <= self.p <= 1.0:
            found.append(("p", self.p, "must be in [0, 1]"))
        if self.target is not None and not 0.0 < self.target < 1.0:
            found.append(("target", self.target, "must be in (0, 1), or null for a fixed p"))
        if self.speed_kimg <= 0:
            found.append(("speed_kimg", self.speed_kimg, "must be > 0"))
        return found


MIN_EVAL_SAMPLES = 10  # the fewest generated samples an evaluation accepts (eval.n_samples, evaluate --n)
FEATURE_NET_NAMES = ("auto", "inception", "mnist_classifier", "torchvision", "stacked_mnist_classifier",
                     "points")


@dataclass
class EvalConfig:
    every: int = 0  # evaluate FID/KID/IS every this many steps (and at the end); 0 disables
    n_samples: int = 5000  # generated samples per evaluation, shared over the ranks
    # auto (mnist_classifier for data.source mnist, else inception) | inception (the FID
    # Inception-v3, 2048-d pool features at 299 px) | mnist_classifier | torchvision |
    # "package.module:build" (see dist_gan.metrics.networks)
    feature_net: str = "auto"
    classifier_path: Optional[str] = None  # mnist_classifier weights; default: the shipped reference
    feature_arch: str = "resnet18"  # torchvision only
    # inception: the FID Inception weights file (pt_inception-2015-12-05-6726825d.pth) on machines
    # without internet (default: fetched once into torch's hub cache); torchvision: a state_dict file
    feature_weights: Optional[str] = None
    real_split: Literal["train", "test"] = "train"  # real reference statistics
    # Reference statistics written by `dist-gan evaluate --reference DATA --out stats.npz`, used
    # instead of embedding the real data in the run
    reference_stats: Optional[str] = None
    batch_size: int = 500

    def problems(self) -> list[tuple[str, Any, str]]:
        found: list[tuple[str, Any, str]] = []
        for name, low in (("every", 0), ("n_samples", MIN_EVAL_SAMPLES), ("batch_size", 1)):
            if getattr(self, name) < low:
                found.append((name, getattr(self, name), f"must be >= {low}"))
        if self.feature_net not in FEATURE_NET_NAMES and ":" not in self.feature_net:
            found.append(("feature_net", self.feature_net,
                          f"is not one of {list(FEATURE_NET_NAMES)} or a 'package.module:function'"))
        if self.reference_stats and not Path(self.reference_stats).is_file():
            found.append(("reference_stats", self.reference_stats,
                          "no such file (write it with dist-gan evaluate --reference DATA --out FILE)"))
        return found

    def resolved_feature_net(self, data: DataConfig) -> str:
        """The feature network ``auto`` stands for: the MNIST classifier for MNIST, the mode-coverage
        networks for StackedMNIST and the 2-D mixtures, else Inception."""
        if self.feature_net != "auto":
            return self.feature_net
        source = data.as_read().source
        if source in POINT_SOURCES:
            return "points"
        return {"mnist": "mnist_classifier", "stacked_mnist": "stacked_mnist_classifier"}.get(source, "inception")


@dataclass
class Ramp:
    """A value that moves from ``start`` to ``end`` over the first ``kimg`` thousand real images of
    training (cosine, as R3GAN's schedules, or linear) and then stays at ``end``."""

    start: float = 0.0
    end: float = 0.0
    kimg: float = 1.0
    shape: Literal["cosine", "linear"] = "cosine"
    # A ramp given only its start would fall to 0 within 1,000 images: every part of it is asked for.
    REQUIRED: ClassVar[tuple[str, ...]] = ("start", "end", "kimg")

    def at(self, kimg: float) -> float:
        t = min(max(kimg / self.kimg, 0.0), 1.0)
        weight = 0.5 * (1.0 - math.cos(math.pi * t)) if self.shape == "cosine" else t
        return self.start + (self.end - self.start) * weight

    def problems(self) -> list[tuple[str, Any, str]]:
        return [("kimg", self.kimg, "must be > 0")] if self.kimg <= 0 else []


@dataclass
class ScheduleConfig:
    """Values ramped over training in images (so a config means the same on 1 or 64 GPUs), each
    ``{start, end, kimg, shape}`` or null (the fixed value from its own key). Logged under its name;
    a resume recomputes it from the step, so it continues exactly."""

    r1_gamma: Optional[Ramp] = None  # loss.r1_gamma (which must be > 0: the term is on)
    r2_gamma: Optional[Ramp] = None  # loss.r2_gamma (likewise)
    g_lr: Optional[Ramp] = None  # optim.g_lr
    d_lr: Optional[Ramp] = None  # optim.d_lr
    beta2: Optional[Ramp] = None  # Adam's beta2 of every optimiser (optim.betas[1])
    ema_kimg: Optional[Ramp] = None  # train.ema_kimg, the EMA's half-life
    augment_p: Optional[Ramp] = None  # augment.p, with augment.target: null (a fixed ramp, as R3GAN's)

    def ramps(self) -> dict[str, Ramp]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def problems(self) -> list[tuple[str, Any, str]]:
        return []


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def problems(self) -> list[tuple[str, Any, str]]:
        found = self._schedule_problems()
        penalised = self.loss.name == "wgan_gp" or self.loss.r1_gamma > 0 or self.loss.r2_gamma > 0
        if penalised and self.model.discriminator.norm == "batch":
            found.append(
                (
                    "model.discriminator.norm",
                    "batch",
                    "BatchNorm mixes samples, which breaks a per-sample gradient penalty; "
                    "use layer, instance or none",
                )
            )
        pack = self.model.discriminator.pack
        if pack >= 1 and self.data.batch_size % pack:
            found.append(("data.batch_size", self.data.batch_size, f"must be a multiple of "
                          f"model.discriminator.pack={pack} (D judges groups of {pack} samples)"))
        if self.run.keep_best and not self.eval.every:
            found.append(("run.keep_best", True, "needs evaluation during training (eval.every > 0)"))
        if self.loss.pl_weight > 0 and self.model.generator.arch != "stylegan2":
            found.append(("loss.pl_weight", self.loss.pl_weight,
                          "path length regularisation needs model.generator.arch: stylegan2 "
                          f"(a w space); the generator is {self.model.generator.arch}"))
        if self.loss.name == "rpgan" and self.model.encoder.arch != "none":
            found.append(("loss.name", "rpgan", "pairs real and fake logits; a VAE-GAN (model.encoder) "
                          "needs ns, hinge or wgan_gp"))
        return found

    def warnings(self) -> list[str]:
        """Valid settings known to train badly, said at the start of a run."""
        found: list[str] = []
        lazy = [f"loss.{name}={getattr(self.loss, name)}" for name in ("r1_every", "r2_every")
                if getattr(self.loss, name) > 1 and getattr(self.loss, name.replace("every", "gamma")) > 0]
        if self.loss.name == "rpgan" and lazy:
            found.append(f"lazy zero-centred penalties ({', '.join(lazy)}) with the RpGAN loss: R3GAN's "
                         "authors found that lazy R1/R2 leads to complete convergence failure on "
                         "StackedMNIST and 2-D mixtures (their appendix E); set them to 1 to penalise "
                         "every D step")
        return found

    def _schedule_problems(self) -> list[tuple[str, Any, str]]:
        ramps = self.schedule.ramps()
        found: list[tuple[str, Any, str]] = []
        for name in ("r1_gamma", "r2_gamma"):
            if name in ramps and getattr(self.loss, name) <= 0:
                found.append((f"schedule.{name}", "set", f"ramps loss.{name}, which is 0 (the term is "
                              f"off): set loss.{name} > 0"))
        if "augment_p" in ramps and (self.augment.kind == "none" or self.augment.target is not None):
            found.append(("schedule.augment_p", "set", "needs augment.kind diffaugment or ada with "
                          "augment.target: null (a fixed ramp instead of ADA's tuning)"))
        if ("g_lr" in ramps or "d_lr" in ramps) and self.optim.lr_schedule != "constant":
            found.append(("optim.lr_schedule", self.optim.lr_schedule, "cannot be combined with a "
                          "learning-rate ramp (schedule.g_lr / d_lr)"))
        if "ema_kimg" in ramps and self.train.ema_decay is not None:
            found.append(("schedule.ema_kimg", "set", "ramps the half-life in images; train.ema_decay "
                          "(per step) is set: unset it"))
        for name, ramp in ramps.items():
            allowed, rule = RAMP_RANGES[name]
            if not all(allowed(v) for v in (ramp.start, ramp.end)):
                found.append((f"schedule.{name}", [ramp.start, ramp.end], f"start and end {rule}"))
        return found


# What every value a ramp passes through must satisfy: the range its fixed key allows (a value
# between start and end is between them, so checking both ends checks the whole ramp).
RAMP_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "r1_gamma": (lambda v: v >= 0, "must be >= 0, as loss.r1_gamma"),
    "r2_gamma": (lambda v: v >= 0, "must be >= 0, as loss.r2_gamma"),
    "g_lr": (lambda v: v > 0, "must be > 0, as optim.g_lr"),
    "d_lr": (lambda v: v > 0, "must be > 0, as optim.d_lr"),
    "beta2": (lambda v: 0 <= v < 1, "must be in [0, 1), as optim.betas (beta2 = 1 never updates "
                                      "Adam's second moment: every step NaN)"),
    "ema_kimg": (lambda v: v >= 0, "must be >= 0, as train.ema_kimg"),
    "augment_p": (lambda v: 0 <= v <= 1, "must be in [0, 1], as augment.p"),
}


def to_dict(config: Any) -> dict:
    """The config as plain YAML-ready data (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None,
                names: Mapping[str, Collection[str]] | None = None) -> Config:
    """Load ``path`` (YAML; None means all defaults), apply dotted ``overrides`` and validate.

    ``names`` maps a dotted key to the values it may take (the registries'); each is checked too.
    """
    raw: dict = {}
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if raw is None:
            raise ConfigError(f"{path} is empty: name at least one section (run: ..., data: ...), or "
                              "give no config file to train on all defaults")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    if overrides:
        source += " with command-line overrides"
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return config_from_dict(raw, source, names)


def config_from_dict(raw: dict, source: str, names: Mapping[str, Collection[str]] | None = None) -> Config:
    """A validated Config from nested plain data (as ``to_dict`` writes it); ``source`` names it in errors."""
    config = _build(Config, raw, prefix="", source=source)
    problems = _collect_problems(config, prefix="")
    for dotted, allowed in (names or {}).items():
        value = _get_dotted(config, dotted)
        if value not in allowed:
            problems.append((dotted, value, _not_one_of(value, allowed)))
    if problems:
        lines = [f"  {key} = {value!r}: {reason}" for key, value, reason in problems]
        raise ConfigError(f"invalid config ({source}):\n" + "\n".join(lines))
    return config


def _get_dotted(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.strip("-").split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {prefix.rstrip('.')!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"{source}: unknown config key '{prefix}{key}'{hint}")
    missing = [key for key in getattr(cls, "REQUIRED", ()) if key not in raw]
    if missing:
        raise ConfigError(f"{source}: {prefix.rstrip('.')} needs {', '.join(missing)} (a ramp is "
                          f"{{start, end, kimg[, shape]}}); it has {sorted(raw) or 'nothing'}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        key, hint, value = prefix + name, hints[name], raw[name]
        optional = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(optional) == 1 and dataclasses.is_dataclass(optional[0]):  # Optional[Ramp]
            empty = value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))
            kwargs[name] = None if empty else _build(typing.cast(type, optional[0]), value, key + ".", source)
        elif dataclasses.is_dataclass(hint):
            kwargs[name] = _build(typing.cast(type, hint), value, key + ".", source)
        else:
            kwargs[name] = _coerce(value, hint, key, source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Convert ``value`` (from YAML, or a string from the command line) to ``hint`` or raise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} = {value!r} is not {expected}")

    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if isinstance(value, str) and hint is not str and origin is not Literal:
        try:
            value = yaml.safe_load(value)  # "200" -> 200, "[0.0, 0.9]" -> list, "true" -> True
        except yaml.YAMLError as err:
            problem = str(getattr(err, "problem", None) or err).splitlines()[0]
            raise ConfigError(f"{source}: {key} = {value!r} is not a valid value ({problem})") from None
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise fail(f"one of {list(args)}")
    if origin is list:
        if isinstance(value, str):  # --run.trackers=tensorboard,wandb
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        return [_coerce(v, args[0], key, source) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("an integer")
    if hint is float:
        number = None
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; a number is meant
            try:
                number = float(value)
            except ValueError:
                raise fail("a number") from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None:
            raise fail("a number")
        if not math.isfinite(number):  # nan passes every range check (nan < 0 is false)
            raise fail("a finite number")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    raise TypeError(f"config field {key} has an unsupported type {hint}")


def _collect_problems(node: Any, prefix: str) -> list[tuple[str, Any, str]]:
    found = [(prefix + key, value, reason) for key, value, reason in node.problems()]
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        if dataclasses.is_dataclass(child):
            found += _collect_problems(child, prefix + f.name + ".")
    return found
