"""Sample quality: the reference feature network, FID/KID/IS (torchmetrics), precision/recall, classes."""

from dist_gan.metrics.classifier import MnistClassifier, load_or_train_classifier, train_classifier
from dist_gan.metrics.evaluator import Evaluator, load_reference, real_embeddings, write_reference
from dist_gan.metrics.networks import FEATURE_NETS, InceptionFeatures, build_feature_net
from dist_gan.metrics.quality import (
                                       Embedder,
                                       Reference,
                                       class_coverage,
                                       feature_statistics,
                                       fid_kid_is,
                                       frechet_distance,
                                       precision_recall,
                                       quality,
)

__all__ = ["FEATURE_NETS", "build_feature_net", "Embedder", "Evaluator", "InceptionFeatures", "MnistClassifier",
           "Reference", "class_coverage", "feature_statistics", "fid_kid_is",
           "frechet_distance", "load_or_train_classifier", "load_reference", "precision_recall", "quality",
           "real_embeddings", "train_classifier", "write_reference"]
