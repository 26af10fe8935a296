"""``ot_distill``: distil a teacher into a student head over a *different* label space (OT).

Options (YAML ``{term: ot_distill, ...}``):

- ``cost``: the ``[C_teacher, C_head]`` cost matrix: a path to a tensor saved
  with ``torch.save`` (e.g. ``rcfast rank-teachers --save-costs DIR`` writes
  one per teacher; loaded with ``weights_only=True``), a nested list, or (from
  Python) a tensor. Build one with :func:`rcfast.select.class_cost_matrix`.
- ``head``: the student head (default: the student's only head).
- ``teacher``: the teacher (default: the run's only teacher).
- ``temperature`` (default 1.0), ``eps`` (0.05, in the cost's units),
  ``max_iters`` (1000), ``tol`` (1e-5): of :func:`rcfast.losses.ot_distill_loss`.
- ``data``: the data stream (default ``proxy``; a labeled task stream works too,
  e.g. beside ``cross_entropy`` on the same head).

Loss: the batch mean of the entropic transport cost between the teacher's and
the head's softened predictions (:class:`rcfast.losses.OTDistillLoss`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from rcfast.losses.ot import OTDistillLoss
from rcfast.train.objectives.base import Term, TermSetup, register_term
from rcfast.train.objectives.inputs import StepInputs, StudentLogits, TeacherLogits

__all__ = ["OTDistill"]


def _load_cost(cost) -> torch.Tensor:
    if isinstance(cost, torch.Tensor):
        return cost.detach().cpu()
    if isinstance(cost, (str, Path)):
        path = Path(cost)
        if not path.is_file():
            raise ValueError(f"cost: file {path} does not exist")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling failure means "not a weights-only tensor file"
            raise ValueError(f"cost: {path} is not a loadable weights-only tensor file: {exc}") from exc
        if not isinstance(loaded, torch.Tensor):
            raise ValueError(f"cost: {path} holds a {type(loaded).__name__}, not a [C_teacher, C_head] tensor")
        return loaded
    if isinstance(cost, (list, tuple)):
        try:
            return torch.tensor(cost, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cost: a nested list must be a [C_teacher, C_head] table of numbers: {exc}") from exc
    raise TypeError(f"cost must be a path, a nested list or a tensor, got {type(cost).__name__}")


@register_term("ot_distill")
class OTDistill(Term):
    """Selective cross-task distillation: OT cost between a teacher's and a head's predictions."""

    def __init__(self, cost, head: str | None = None, teacher: str | None = None, temperature: float = 1.0,
                 eps: float = 0.05, max_iters: int = 1000, tol: float = 1e-5, data: str | None = None) -> None:
        super().__init__()
        for option, value in (("head", head), ("teacher", teacher), ("data", data)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{option} must be a name, got {value!r}")
        # OTDistillLoss checks the cost (2-D, finite) and the solver options.
        self.loss = OTDistillLoss(_load_cost(cost).float(), temperature=temperature, eps=eps,
                                  max_iters=max_iters, tol=tol)
        self.head, self.teacher, self.data = head, teacher, data

    @staticmethod
    def _only(setup: TermSetup, option: str, names: dict) -> str:
        if len(names) != 1:
            raise setup.error(f"{option}: the run has {len(names)} {option}s {list(names)}; say which one")
        return next(iter(names))

    def bind(self, setup: TermSetup) -> None:
        head = setup.head(self.head) if self.head is not None else self._only(setup, "head", setup.heads)
        teacher = (setup.teacher(self.teacher) if self.teacher is not None
                   else self._only(setup, "teacher", setup.teachers))
        expected = (setup.teachers[teacher], setup.heads[head])
        if tuple(self.loss.cost.shape) != expected:
            raise setup.error(f"cost is {list(self.loss.cost.shape)} but teacher {teacher!r} has {expected[0]} "
                              f"classes and head {head!r} {expected[1]}: it must be [C_teacher, C_head] = "
                              f"{list(expected)}")
        stream = setup.stream(self.data)
        self.student_key = setup.need(StudentLogits(stream, (head,)))
        self.teacher_key = setup.need(TeacherLogits(stream, (teacher,)))

    def forward(self, step: StepInputs) -> torch.Tensor:
        return self.loss(step[self.student_key], step[self.teacher_key])
