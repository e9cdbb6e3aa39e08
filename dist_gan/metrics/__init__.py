"""Sample quality: the reference feature network, FID/KID/IS (torchmetrics), precision/recall, classes."""

from dist_gan.metrics.classifier import MnistClassifier, load_or_train_classifier, train_classifier
from dist_gan.metrics.evaluator import Evaluator, evaluate_checkpoint, real_embeddings
from dist_gan.metrics.networks import FEATURE_NETS, build_feature_net
from dist_gan.metrics.quality import Embedder, class_coverage, fid_kid_is, precision_recall, quality

__all__ = ["FEATURE_NETS", "build_feature_net", "Embedder", "Evaluator", "MnistClassifier", "class_coverage", "evaluate_checkpoint",
           "fid_kid_is", "load_or_train_classifier", "precision_recall", "quality", "real_embeddings",
           "train_classifier"]
