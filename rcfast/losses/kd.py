"""``MultiHeadKDLoss``: the ``nn.Module`` form of :func:`rcfast.multihead_kd_loss`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rcfast.ops.multihead_kd import multihead_kd_loss

__all__ = ["MultiHeadKDLoss"]


class MultiHeadKDLoss(nn.Module):
    """Multi-head softened-KL distillation loss with fixed heads and settings.

    ``loss = MultiHeadKDLoss(splits=[1000, 100], temperature=[4.0, 2.0])``
    then ``loss(student_logits, teacher_logits)``. See
    :func:`rcfast.multihead_kd_loss` for the arguments.
    """

    def __init__(
        self,
        splits: Sequence[int] | None = None,
        temperature: float | Sequence[float] = 4.0,
        weights: Sequence[float] | None = None,
        reduction: str = "batchmean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.splits = None if splits is None else list(splits)
        self.temperature = temperature if isinstance(temperature, (int, float)) else list(temperature)
        self.weights = None if weights is None else list(weights)
        self.reduction = reduction
        self.backend = backend

    def forward(self, student, teacher) -> torch.Tensor:
        return multihead_kd_loss(
            student, teacher, splits=self.splits, temperature=self.temperature,
            weights=self.weights, reduction=self.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"splits={self.splits}, temperature={self.temperature}, weights={self.weights}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
