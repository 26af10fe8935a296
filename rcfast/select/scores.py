"""Scores of a teacher for a labeled target sample, from one pass of the teacher over it.

- :func:`ot_score` (selective cross-task distillation, arXiv 2204.11526): the
  mean entropic transport cost from the teacher's softened prediction over its
  classes to the target label, under the prototype cost matrix of
  :mod:`rcfast.select.cost`. Lower = more related.
- :func:`leep_score` (LEEP, Nguyen et al., ICML 2020): the mean log-likelihood
  of the target labels under the "empirical predictor" that maps the teacher's
  class distribution through the empirical conditional P(y | z). Higher = more
  related.
- :func:`linear_probe_score`: the accuracy of a linear probe on the teacher's
  features (:func:`rcfast.eval.linear_probe` on a stratified split). Higher =
  more related; it fits a model, so it is the costly upper reference.
"""
from __future__ import annotations

import math

import torch

from rcfast.extras import require
from rcfast.ops.sinkhorn import sinkhorn
from rcfast.select.outputs import check_labels

__all__ = ["ot_score", "leep_score", "linear_probe_score", "LINEAR_PROBE_MODULES"]

#: what the linear-probe score imports (the [train] extra)
LINEAR_PROBE_MODULES = ("numpy", "sklearn", "threadpoolctl")


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [N, C] tensor, got {getattr(logits, 'shape', logits)!r}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be [N] = [{logits.shape[0]}], got {tuple(labels.shape)}")


def ot_score(logits: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, *, temperature: float = 1.0,
             eps: float = 0.05, label_smoothing: float = 0.0, max_iters: int = 1000, tol: float = 1e-6) -> float:
    """Mean Sinkhorn cost ``OT(softmax(logits / temperature), target(y), cost)`` over the sample.

    ``target(y)`` is the one-hot label, smoothed as ``(1 - s) onehot + s / C``
    with ``label_smoothing = s``. With one-hot targets the only feasible plan
    sends all of the teacher's mass to ``y``, so the score is exactly the
    expected cost ``sum_k p_k C[k, y]``; smoothing lets the transport choose.
    ``cost`` is ``[C_teacher, C_target]``.
    """
    _check_logits(logits, labels)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if cost.dim() != 2 or cost.shape[0] != logits.shape[1]:
        raise ValueError(f"cost must be [C_teacher, C_target] with C_teacher = {logits.shape[1]}, got "
                         f"{tuple(cost.shape)}")
    num_classes = check_labels(labels, cost.shape[1])
    source = torch.softmax(logits.double() / temperature, dim=1)
    target = torch.nn.functional.one_hot(labels.long(), num_classes).double()
    target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
    return float(sinkhorn(source, target, cost.double(), eps=eps, max_iters=max_iters, tol=tol).mean())


def leep_score(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> float:
    """LEEP: ``mean_i log sum_z P(y_i | z) theta_z(x_i)`` with ``theta = softmax(logits)`` and
    ``P(y | z)`` the empirical joint ``mean_i theta_z(x_i) [y_i = y]`` over its ``z`` marginal."""
    _check_logits(logits, labels)
    num_classes = check_labels(labels, num_classes)
    theta = torch.softmax(logits.double(), dim=1)                                       # [N, Z]
    joint = torch.zeros(num_classes, theta.shape[1], dtype=torch.float64).index_add_(0, labels.long(), theta)
    conditional = joint / joint.sum(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    expected = (theta * conditional[labels.long()]).sum(dim=1)                         # EEP(y_i | x_i)
    return float(torch.log(expected).mean())


def linear_probe_score(features: torch.Tensor, labels: torch.Tensor, *, test_fraction: float = 0.5,
                       seed: int = 0) -> float:
    """Test accuracy of :func:`rcfast.eval.linear_probe` on a stratified split of the sample."""
    require("the linear-probe score", *LINEAR_PROBE_MODULES)
    from sklearn.model_selection import train_test_split

    from rcfast.eval.linear_probe import linear_probe

    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features [N, D] and labels [N] must match, got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    check_labels(labels, None)
    x, y = features.numpy(), labels.long().numpy()
    counts = torch.bincount(labels.long())
    stratify = y if int(counts[counts > 0].min()) >= 2 else None
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                                        stratify=stratify)
    return float(linear_probe(train_x, train_y, test_x, test_y, seed=seed)["accuracy"])
