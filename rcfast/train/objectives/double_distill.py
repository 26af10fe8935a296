"""``double_distill``: DMC's double distillation of disjoint teachers into one head over their union.

Options (YAML ``{term: double_distill, ...}``):

- ``head``: the student head over the union of the teachers' classes (default:
  the student's only head).
- ``teachers``: the teachers, in the order their classes sit in the head
  (default: every teacher of the run, in config order).
- ``classes``: optional, one list of head columns per teacher (e.g. the global
  class ids of a class-incremental benchmark); declares the teachers' class sets
  disjoint, so a column listed twice is an error. Default: side by side in order.
- ``data``: the data stream (default ``proxy``: unlabeled auxiliary images).

Loss: :func:`rcfast.losses.double_distill_loss`, the mean squared error between
the head's logits and each teacher's logits centred per sample over its own
classes. Per-teacher values are logged as parts.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rcfast.losses.dmc import DoubleDistillLoss, double_distill_target
from rcfast.train.objectives.base import Term, TermSetup, register_term
from rcfast.train.objectives.inputs import StepInputs, StudentLogits, TeacherLogits
from rcfast.train.objectives.options import only_head

__all__ = ["DoubleDistill"]


@register_term("double_distill")
class DoubleDistill(Term):
    """Regress a head's logits on the per-sample centred logits of disjoint teachers (DMC)."""

    def __init__(self, head: str | None = None, teachers: Sequence[str] | None = None,
                 classes: Sequence[Sequence[int]] | None = None, data: str | None = None) -> None:
        super().__init__()
        if head is not None and not isinstance(head, str):
            raise TypeError(f"head must be a head name, got {head!r}")
        if teachers is not None and (isinstance(teachers, str) or not isinstance(teachers, Sequence)):
            raise TypeError(f"teachers must be a list of teacher names, got {teachers!r}")
        self.head_option, self.teachers_option, self.classes_option, self.data = head, teachers, classes, data

    def bind(self, setup: TermSetup) -> None:
        head = only_head(setup, self.head_option)
        teachers = list(self.teachers_option) if self.teachers_option is not None else list(setup.teachers)
        if not teachers:
            raise setup.error("teachers: the run has no teachers to consolidate")
        for teacher in teachers:
            setup.teacher(teacher, option="teachers")
        if len(set(teachers)) != len(teachers):
            raise setup.error(f"teachers: a teacher appears twice in {teachers}")
        splits = [setup.teachers[t] for t in teachers]
        if sum(splits) != setup.heads[head]:
            raise setup.error(f"head {head!r} has {setup.heads[head]} classes, but the teachers {teachers} have "
                              f"{splits} = {sum(splits)}: the head must cover the union of their classes")
        # Checks `classes` (disjoint, in range, one column per teacher class) now, before training.
        self.loss = DoubleDistillLoss(splits, self.classes_option)
        self.teacher_names = teachers
        stream = setup.stream(self.data)
        self.student_key = setup.need(StudentLogits(stream, (head,)))
        self.teacher_key = setup.need(TeacherLogits(stream, tuple(teachers)))

    def forward(self, step: StepInputs) -> torch.Tensor:
        return self.loss(step[self.student_key], step[self.teacher_key])

    def parts(self, step: StepInputs) -> dict[str, torch.Tensor]:
        """The squared error on each teacher's own columns (their mean, weighted by size, is the loss)."""
        student = step[self.student_key]
        target = double_distill_target(step[self.teacher_key], self.loss.splits, self.loss.classes)
        error = (student.to(target.dtype) - target).square().mean(dim=0)
        columns = self.loss.classes
        if columns is None:
            bounds = torch.tensor(self.loss.splits).cumsum(0).tolist()
            columns = [list(range(end - size, end)) for end, size in zip(bounds, self.loss.splits)]
        return {name: error[ids].mean() for name, ids in zip(self.teacher_names, columns)}
