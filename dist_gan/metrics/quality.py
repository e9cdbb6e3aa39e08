"""Sample quality from embeddings: FID (from mean and covariance), KID and Inception Score via
torchmetrics, k-NN precision and recall, and the class histogram (mode coverage).

Images are embedded once by the reference network (features for FID/KID/precision/recall, logits for
IS and classes). The real side is a ``Reference``: mean, covariance and count of the real features
(all FID needs, so a data set's statistics can be computed once and stored, as every FID tool does)
plus a seeded subset of the features themselves for KID and precision/recall. KID and IS are
torchmetrics', fed the embeddings through ``Precomputed``, a module that hands them on unchanged.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import torch
import torch.nn as nn
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

# real features kept in a Reference for KID and precision/recall (FID uses the full statistics)
KEPT_FEATURES = 10000


class FeatureNet(Protocol):
    """What the metrics call on a feature network (an ``nn.Module``, reached through its dynamic
    attributes): ``embed(images) -> (features, logits)``."""

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class ModeNet(FeatureNet, Protocol):
    """A feature network that assigns each sample a mode (``metrics/modes.py``)."""

    modes: int

    def mode_ids(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor: ...


class Precomputed(nn.Module):
    """A torchmetrics feature extractor over embeddings that were already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.double()


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as a PNG would keep them: clamped and quantised to 8 bits (clean-fid's first
    step). Real data is already so; a generator without a final tanh (r3gan) is judged on the images a
    user would save, not on values outside the pixel range."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class Embedder:
    """Batched ``(features, logits)`` of images in [-1, 1] (``as_saved`` first, unless the network's
    ``takes_pixels`` is False: the 2-D mixtures' points) from a feature network's
    ``embed``, run on ``device`` (a GPU embeds 299 px Inception inputs ~100x faster); results on the CPU."""

    def __init__(self, network: nn.Module, batch_size: int = 500, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.network, self.batch_size = network.eval().to(self.device), batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        saved = as_saved if getattr(self.network, "takes_pixels", True) else torch.Tensor.float
        embed = cast(FeatureNet, self.network).embed
        pairs = [embed(saved(chunk.to(self.device))) for chunk in images.split(self.batch_size)]
        return (torch.cat([f for f, _ in pairs]).float().cpu(), torch.cat([y for _, y in pairs]).float().cpu())


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (as numpy's ``cov``, which pytorch-fid uses), in float64."""
    x = features.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor,
                     cov2: torch.Tensor) -> float:
    """||m1 - m2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) (Dowson & Landau; Heusel et al.'s FID), float64.

    Tr((C1 C2)^(1/2)) is computed as the trace of the root of the symmetric PSD matrix
    C1^(1/2) C2 C1^(1/2), which has the same eigenvalues as C1 C2, through ``eigh``: no complex
    square roots of a nearly singular product, which is where scipy's ``sqrtm`` needs an epsilon."""
    mean1, mean2, cov1, cov2 = (t.double() for t in (mean1, mean2, cov1, cov2))
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_root)


@dataclass
class Reference:
    """Real data in one feature space: what FID needs (mean, covariance, count) and a seeded subset
    of the features for KID and precision/recall. ``meta`` says which network, data and size made
    it, so statistics from another feature space are refused rather than compared."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    features: torch.Tensor
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: torch.Tensor, meta: dict | None = None, keep: int = KEPT_FEATURES,
                      seed: int = 0) -> "Reference":
        mean, cov = feature_statistics(features)
        kept = features
        if len(features) > keep:
            pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:keep]
            kept = features[pick.sort().values]
        return cls(mean, cov, len(features), kept.float(), dict(meta or {}))

    def save(self, path: str | Path) -> None:
        """One .npz (mu and sigma under pytorch-fid's names, so other tools can read it too), written
        to a temporary name first so a kill leaves no half file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=self.mean.numpy(), sigma=self.cov.numpy(), count=np.int64(self.count),
                 features=self.features.numpy(), meta=np.array(json.dumps(self.meta)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"])) if "meta" in data else {}
                features = torch.from_numpy(data["features"]) if "features" in data else None
                mean, cov = torch.from_numpy(data["mu"]).double(), torch.from_numpy(data["sigma"]).double()
                count = int(data["count"]) if "count" in data else 0
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path} is not a reference statistics file (mu, sigma, count, features): "
                             f"{err}") from err
        if mean.ndim != 1 or cov.shape != (len(mean), len(mean)):
            raise ValueError(f"{path}: mu {tuple(mean.shape)} and sigma {tuple(cov.shape)} do not fit")
        if features is None:  # mu and sigma only (e.g. pytorch-fid's files): FID, no KID / PR
            features = torch.empty(0, len(mean))
        return cls(mean, cov, count, features.float(), meta)


def kid_and_is(real_feats: torch.Tensor, fake_feats: torch.Tensor, fake_logits: torch.Tensor,
               kid_subset: int = 1000, seed: int = 0) -> dict[str, float]:
    """KID (torchmetrics, 50 subsets; NaN without real features) and the Inception Score of the
    logits. Their random subsets and splits come from ``seed`` in a forked generator: the same
    figures for the same embeddings, and the training run's random streams untouched."""
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # "will save all extracted features": expected, they are small
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        score = InceptionScore(feature=Precomputed(fake_logits.shape[1]), splits=10)
        out = {"kid": float("nan"), "kid_std": float("nan")}
        subset = min(kid_subset, len(real_feats), len(fake_feats))
        if subset >= 2:
            kid = KernelInceptionDistance(feature=Precomputed(real_feats.shape[1]), subset_size=subset,
                                          subsets=50)
            kid.update(real_feats, real=True)
            kid.update(fake_feats, real=False)
            kid_mean, kid_std = kid.compute()
            out = {"kid": float(kid_mean), "kid_std": float(kid_std)}
        score.update(fake_logits)
        is_mean, is_std = score.compute()
    return {**out, "is": float(is_mean), "is_std": float(is_std)}


def fid_kid_is(real: torch.Tensor | Reference, fake_feats: torch.Tensor, fake_logits: torch.Tensor,
               kid_subset: int = 1000, seed: int = 0) -> dict[str, float]:
    """FID against ``real`` (features, or their Reference), KID and IS."""
    reference = real if isinstance(real, Reference) else Reference.from_features(real, keep=len(real))
    fid = frechet_distance(reference.mean, reference.cov, *feature_statistics(fake_feats))
    return {"fid": fid, **kid_and_is(reference.features, fake_feats, fake_logits, kid_subset, seed)}


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3,
                     chunk: int = 1000) -> dict[str, float]:
    """Kynkäänniemi et al. 2019: the share of fake samples inside the real manifold (precision) and of
    real samples inside the fake manifold (recall); a manifold is the union of k-NN balls."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])

    def covered(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        inside = torch.cat([(torch.cdist(c, centres) <= r[None]).any(1) for c in points.split(chunk)])
        return inside.float().mean().item()

    real, fake = real.float(), fake.float()
    return {"precision": covered(fake, real, radii(real)), "recall": covered(real, fake, radii(fake))}


def class_coverage(logits: torch.Tensor, min_share: float = 0.05) -> dict[str, float]:
    """Predicted-class histogram: classes holding >= ``min_share`` of samples, KL to uniform, min share."""
    classes = logits.shape[1]
    shares = torch.bincount(logits.argmax(1), minlength=classes).double() / len(logits)
    nonzero = shares[shares > 0]
    kl = float((nonzero * (nonzero * classes).log()).sum())
    return {"classes_covered": int((shares >= min_share).sum()), "class_kl_uniform": kl,
            "min_class_share": float(shares.min()), **{f"class_share_{i}": float(s) for i, s in enumerate(shares)}}


def quality(real: torch.Tensor | Reference, fake_feats: torch.Tensor, fake_logits: torch.Tensor,
            seed: int = 0, data_classes: bool = True) -> dict[str, float]:
    """Every figure at once for one set of generated embeddings against the real ones (features or
    a Reference); ``data_classes``: the logits are the data set's classes (report the histogram).

    Precision and recall compare equal-sized sets: the real set is subsampled (seeded) to the size of
    the generated one, which also keeps their k-NN search quadratic in the smaller size.
    """
    out = fid_kid_is(real, fake_feats, fake_logits, seed=seed)
    if data_classes:
        out.update(class_coverage(fake_logits))
    real_feats = real.features if isinstance(real, Reference) else real
    if len(real_feats) > len(fake_feats):
        pick = torch.randperm(len(real_feats), generator=torch.Generator().manual_seed(seed))
        real_feats = real_feats[pick[: len(fake_feats)]]
    if len(real_feats) > 3:
        out.update(precision_recall(real_feats, fake_feats))
    return out
