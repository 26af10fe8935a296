"""Top-1 accuracy of a classifier over a labeled dataset."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["classifier_accuracy"]


def classifier_accuracy(model: nn.Module, data, device: torch.device | str | None = None) -> float:
    """Fraction of ``(images, labels)`` batches in ``data`` whose argmax logit is the label."""
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.inference_mode():
            for images, labels in data:
                pred = model(images.to(device, non_blocking=True)).argmax(dim=1).cpu()
                correct += int((pred == labels.cpu()).sum())
                total += int(labels.shape[0])
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("data yielded no samples")
    return correct / total
