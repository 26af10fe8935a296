"""Transfer evaluation of frozen backbones: features, linear probe, kNN, fine-tune."""
from rcfast.extras import require

require("rcfast.eval", "numpy", "sklearn", "threadpoolctl")  # before anything below imports them

# ruff: noqa: E402
from rcfast.eval.accuracy import classifier_accuracy
from rcfast.eval.features import extract_features
from rcfast.eval.finetune import finetune_accuracy
from rcfast.eval.knn import knn_accuracy
from rcfast.eval.linear_probe import linear_probe
from rcfast.eval.transfer import evaluate_transfer

__all__ = ["classifier_accuracy", "extract_features", "linear_probe", "knn_accuracy", "finetune_accuracy", "evaluate_transfer"]
