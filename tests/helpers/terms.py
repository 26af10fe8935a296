"""A test-only objective term with trainable parameters: ``regression_probe``.

A linear map from the student's backbone features (a forward-hooked layer) to
one teacher's logits, trained with the student under an MSE loss. It exercises
everything a parameterised term needs from the trainer: hooked student
features, teacher logits, a shape probe at bind time, its parameters in the
optimiser, DDP synchronisation and exact resume from checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rcfast.train.objectives import StudentLayer, TeacherLogits, Term, register_term


@register_term("regression_probe")
class RegressionProbe(Term):
    def __init__(self, teacher: str, layer: str = "backbone", data: str | None = None) -> None:
        super().__init__()
        self.teacher, self.layer, self.data = teacher, layer, data

    def bind(self, setup) -> None:
        stream = setup.stream(self.data)
        setup.teacher(self.teacher)
        self.features = StudentLayer(stream, self.layer)
        width = setup.probe(self.features)[1]
        self.target = setup.need(TeacherLogits(stream, (self.teacher,)))
        self.linear = nn.Linear(width, setup.teachers[self.teacher])

    def forward(self, step) -> torch.Tensor:
        prediction = self.linear(step[self.features].float().flatten(1))
        return F.mse_loss(prediction, step[self.target].float())
