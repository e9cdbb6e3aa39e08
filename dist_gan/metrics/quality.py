"""Sample quality from embeddings: FID, KID and Inception Score via torchmetrics, k-NN precision and
recall, and the class histogram (mode coverage).

Images are embedded once by the reference network (features for FID/KID/precision/recall, logits for
IS and classes). torchmetrics then receives those embeddings through ``Precomputed``, a module that
hands them on unchanged: the metric arithmetic is torchmetrics', and real-data embeddings can be cached.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance


class Precomputed(nn.Module):
    """A torchmetrics feature extractor over embeddings that were already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.double()


class Embedder:
    """Batched ``(features, logits)`` of images in [-1, 1] from a feature network's ``embed``."""

    def __init__(self, network: nn.Module, batch_size: int = 500):
        self.network, self.batch_size = network.eval(), batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.network.embed(chunk.float().cpu()) for chunk in images.split(self.batch_size)]
        return torch.cat([f for f, _ in pairs]).float(), torch.cat([l for _, l in pairs]).float()


def fid_kid_is(real_feats: torch.Tensor, fake_feats: torch.Tensor, fake_logits: torch.Tensor,
               kid_subset: int = 1000) -> dict[str, float]:
    dim = real_feats.shape[1]
    fid = FrechetInceptionDistance(feature=Precomputed(dim))
    subset = min(kid_subset, len(real_feats), len(fake_feats))
    with warnings.catch_warnings():  # "will save all extracted features": expected, they are small
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=Precomputed(dim), subset_size=subset, subsets=50)
        score = InceptionScore(feature=Precomputed(fake_logits.shape[1]), splits=10)
    for metric in (fid, kid):
        metric.update(real_feats, real=True)
        metric.update(fake_feats, real=False)
    score.update(fake_logits)
    kid_mean, kid_std = kid.compute()
    is_mean, is_std = score.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "is": float(is_mean), "is_std": float(is_std)}


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


def quality(real_feats: torch.Tensor, fake_feats: torch.Tensor, fake_logits: torch.Tensor,
            seed: int = 0) -> dict[str, float]:
    """Every figure at once for one set of generated embeddings against the real ones.

    Precision and recall compare equal-sized sets: the real set is subsampled (seeded) to the size of
    the generated one, which also keeps their k-NN search quadratic in the smaller size.
    """
    out = fid_kid_is(real_feats, fake_feats, fake_logits)
    out.update(class_coverage(fake_logits))
    if len(real_feats) > len(fake_feats):
        pick = torch.randperm(len(real_feats), generator=torch.Generator().manual_seed(seed))
        real_feats = real_feats[pick[: len(fake_feats)]]
    out.update(precision_recall(real_feats, fake_feats))
    return out
