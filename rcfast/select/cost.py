"""The cost of moving mass between a teacher's classes and a target task's classes.

Each target class ``c`` gets a prototype in the teacher's feature space: the
mean teacher feature of its labeled target images. Teacher class ``k`` is
represented by its classifier direction, the row ``w_k`` of the final
``nn.Linear``. The cost ``C[k, c]`` is a distance between the two, in [0, 1]:

- ``"cosine"`` (default): ``(1 - cos(w_k, mu_c)) / 2`` -- scale-free, so
  costs of different teachers are on one scale;
- ``"euclidean"``: ``||w_k - mu_c||`` divided by the largest entry.

A teacher whose classifier points its class ``k`` where the target images of
class ``c`` lie in its feature space transports ``k`` to ``c`` cheaply.
"""
from __future__ import annotations

import torch
from torch import nn

from rcfast.select.outputs import check_labels, classifier_outputs

__all__ = ["METRICS", "prototype_cost", "class_cost_matrix"]

METRICS = ("cosine", "euclidean")


def prototype_cost(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                   num_classes: int | None = None, metric: str = "cosine") -> torch.Tensor:
    """``[C_teacher, C_target]`` costs in [0, 1] from features ``[N, D]``, labels ``[N]`` and the
    teacher's classifier weight ``[C_teacher, D]`` (see the module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(f"features [N, D] and weight [C, D] must share D, got {tuple(features.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be [N] = [{features.shape[0]}], got {tuple(labels.shape)}")
    num_classes = check_labels(labels, num_classes)
    features, weight = features.double(), weight.double()
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64).index_add_(0, labels.long(), features)
    prototypes = sums / torch.bincount(labels.long(), minlength=num_classes).unsqueeze(1)
    if metric == "cosine":
        cosine = nn.functional.normalize(weight, dim=1) @ nn.functional.normalize(prototypes, dim=1).T
        cost = (1.0 - cosine) / 2.0
    else:
        cost = torch.cdist(weight, prototypes)
        cost = cost / cost.max() if cost.max() > 0 else cost
    return cost.clamp_(0.0, 1.0).float()


def class_cost_matrix(teacher: nn.Module, images, labels=None, *, num_classes: int | None = None,
                      metric: str = "cosine", batch_size: int = 256, device=None) -> torch.Tensor:
    """The ``[C_teacher, C_target]`` cost matrix of ``teacher`` for a labeled target sample.

    Args:
        teacher: a classifier whose last module is an ``nn.Linear`` (its input
            is the feature space; its rows the teacher's classes).
        images, labels: the labeled target sample, as tensors ``[N, ...]`` and
            ``[N]`` or as an iterable of ``(images, labels)`` batches
            (``ProxyImages(labels=True)``) with ``labels=None``.
        num_classes: target classes (default: ``labels.max() + 1``, or the
            data's ``num_classes`` attribute); every class needs a sample.
        metric: ``"cosine"`` or ``"euclidean"`` (see the module docstring).

    Returns a float32 CPU tensor with entries in [0, 1], ready for
    :func:`rcfast.ops.sinkhorn` and :class:`rcfast.losses.OTDistillLoss`.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if num_classes is None and labels is None:
        num_classes = getattr(images, "num_classes", None)
    outputs = classifier_outputs(teacher, images, labels, batch_size=batch_size, device=device, name="teacher")
    return prototype_cost(outputs.features, outputs.labels, outputs.weight, num_classes, metric)
