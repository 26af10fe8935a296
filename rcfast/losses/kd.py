"""``MultiHeadKDLoss``: the ``nn.Module`` form of :func:`rcfast.multihead_kd_loss`
(and, with ``fused_linear=True``, of :func:`rcfast.fused_linear_multihead_kd_loss`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rcfast.ops.fused_linear_kd import fused_linear_multihead_kd_loss
from rcfast.ops.multihead_kd import multihead_kd_loss

__all__ = ["MultiHeadKDLoss"]


class MultiHeadKDLoss(nn.Module):
    """Multi-head softened-KL distillation loss with fixed heads and settings.

    ``loss = MultiHeadKDLoss(splits=[1000, 100], temperature=[4.0, 2.0])``
    then ``loss(student_logits, teacher_logits)``. See
    :func:`rcfast.multihead_kd_loss` for the arguments.

    With ``fused_linear=True`` the student's packed head is fused into the loss
    (:func:`rcfast.fused_linear_multihead_kd_loss`: the logits never exist):
    ``loss(features, teacher, head)`` with the features entering the head and
    ``head`` an ``nn.Linear`` (e.g. ``MultiHeadStudent.heads``) or a tuple
    ``(weight[, bias])``; ``teacher`` is logits or ``(teacher_hidden,
    teacher_weight[, teacher_bias])``.
    """

    def __init__(
        self,
        splits: Sequence[int] | None = None,
        temperature: float | Sequence[float] = 4.0,
        weights: Sequence[float] | None = None,
        reduction: str = "batchmean",
        backend: str = "auto",
        fused_linear: bool = False,
    ) -> None:
        super().__init__()
        self.splits = None if splits is None else list(splits)
        self.temperature = temperature if isinstance(temperature, (int, float)) else list(temperature)
        self.weights = None if weights is None else list(weights)
        self.reduction = reduction
        self.backend = backend
        self.fused_linear = bool(fused_linear)

    def forward(self, student, teacher, head=None) -> torch.Tensor:
        if self.fused_linear:
            weight, bias = _head_parameters(head)
            return fused_linear_multihead_kd_loss(
                student, weight, teacher, splits=self.splits, bias=bias, temperature=self.temperature,
                weights=self.weights, reduction=self.reduction, backend=self.backend,
            )
        if head is not None:
            raise TypeError("head is taken only by MultiHeadKDLoss(fused_linear=True); "
                            "without it pass the student's logits")
        return multihead_kd_loss(
            student, teacher, splits=self.splits, temperature=self.temperature,
            weights=self.weights, reduction=self.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"splits={self.splits}, temperature={self.temperature}, weights={self.weights}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}"
                + (", fused_linear=True" if self.fused_linear else ""))


def _head_parameters(head):
    """``(weight, bias)`` of the packed head: an ``nn.Linear`` or a ``(weight[, bias])`` tuple."""
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, (tuple, list)) and len(head) in (1, 2):
        return head[0], head[1] if len(head) == 2 else None
    raise TypeError("MultiHeadKDLoss(fused_linear=True) takes (features, teacher, head) with head the "
                    "student's packed nn.Linear (e.g. MultiHeadStudent.heads) or a (weight[, bias]) tuple, "
                    f"got head={type(head).__name__}")
