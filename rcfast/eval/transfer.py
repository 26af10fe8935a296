"""``evaluate_transfer``: linear probe, kNN and optional fine-tune of one frozen backbone."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rcfast.eval.features import extract_features
from rcfast.eval.finetune import finetune_accuracy
from rcfast.eval.knn import knn_accuracy
from rcfast.eval.linear_probe import linear_probe

__all__ = ["evaluate_transfer"]


def evaluate_transfer(backbone: nn.Module, train_data, test_data, *, Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
                      knn_k: int | Sequence[int] = 10, finetune_epochs: int = 0, finetune_lr: float = 1e-3,
                      num_classes: int | None = None, device: torch.device | str | None = None,
                      precision: str = "fp32", seed: int = 0) -> dict:
    """Transfer accuracies of ``backbone`` on a labeled downstream task.

    Features of ``train_data`` and ``test_data`` (``(images, labels)`` batches,
    e.g. ``ProxyImages(..., labels=True, augment="center")``) are extracted once
    from the frozen backbone, then scored by a linear probe (C chosen on a
    validation split of train) and cosine kNN. With ``finetune_epochs > 0`` a
    copy of the backbone is also fine-tuned with a new head.

    Returns ``{"linear_probe": acc, "linear_probe_C": C, "knn@<k>": acc, ...,
    ["finetune": acc]}``.
    """
    train_x, train_y = extract_features(backbone, train_data, device, precision)
    test_x, test_y = extract_features(backbone, test_data, device, precision)
    probe = linear_probe(train_x, train_y, test_x, test_y, Cs=Cs, seed=seed)
    result = {"linear_probe": probe["accuracy"], "linear_probe_C": probe["best_C"]}
    for k, acc in knn_accuracy(train_x, train_y, test_x, test_y, k=knn_k).items():
        result[f"knn@{k}"] = acc
    if finetune_epochs > 0:
        classes = num_classes if num_classes is not None else int(max(train_y.max(), test_y.max())) + 1
        if device is None:
            param = next(backbone.parameters(), None)
            device = param.device if param is not None else "cpu"
        result["finetune"] = finetune_accuracy(backbone, train_data, test_data, classes, epochs=finetune_epochs,
                                               lr=finetune_lr, device=device, precision=precision, seed=seed)
    return result
