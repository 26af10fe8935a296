"""``multihead_kd``: softened-KL distillation of teachers into student heads, fused over all heads.

Options (YAML ``{term: multihead_kd, ...}``):

- ``heads``: which student heads to distil and from which teacher. ``null``
  (default): every student head, each from the teacher of the same name;
  a list of heads (each from its same-named teacher); or ``{head: teacher}``.
- ``temperature``: one float for all heads or ``{head: float}`` (default 4.0).
- ``head_weights``: one float >= 0 or ``{head: float}`` (default 1.0), inside the
  term (the entry's ``weight`` scales the whole term).
- ``data``: the data stream (default ``proxy``).

Loss: :func:`rcfast.multihead_kd_loss` with ``reduction="batchmean"`` on the
run's ``train.loss_backend``; per-head values are logged as parts.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from rcfast.ops.multihead_kd import multihead_kd_loss
from rcfast.train.objectives.base import Term, TermSetup, register_term
from rcfast.train.objectives.inputs import StepInputs, StudentLogits, TeacherLogits

__all__ = ["MultiHeadKD"]


def _check_number(option: str, value, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{option} must be a finite number or a {{head: number}} mapping, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{option} must be > 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{option} must be >= 0, got {value!r}")


def _check_per_head(option: str, value, positive: bool) -> None:
    if isinstance(value, Mapping):
        for head, v in value.items():
            _check_number(f"{option}[{head!r}]", v, positive)
    else:
        _check_number(option, value, positive)


def per_head(setup: TermSetup, option: str, value, heads: list[str]) -> list[float]:
    """One float per head from a float or a ``{head: float}`` mapping that names exactly ``heads``."""
    if not isinstance(value, Mapping):
        return [float(value)] * len(heads)
    missing = [h for h in heads if h not in value]
    unknown = [h for h in value if h not in heads]
    if missing or unknown:
        raise setup.error(f"{option} must give one value per distilled head {heads} "
                          f"(missing {missing}, unknown {unknown})")
    return [float(value[h]) for h in heads]


@register_term("multihead_kd")
class MultiHeadKD(Term):
    """Multi-head KD: ``sum_h w_h tau_h^2 KL(softmax(t_h/tau_h) || softmax(s_h/tau_h))``, batch mean."""

    def __init__(self, heads: list | dict | None = None, temperature: float | dict = 4.0,
                 head_weights: float | dict = 1.0, data: str | None = None) -> None:
        super().__init__()
        if heads is not None and not isinstance(heads, (list, tuple, Mapping)):
            raise TypeError(f"heads must be null, a list of heads or a {{head: teacher}} mapping, got {heads!r}")
        _check_per_head("temperature", temperature, positive=True)
        _check_per_head("head_weights", head_weights, positive=False)
        # The options as given; bind() resolves them against the run's heads.
        self.heads_option, self.temperature_option, self.head_weights_option = heads, temperature, head_weights
        self.data = data

    def bind(self, setup: TermSetup) -> None:
        option = self.heads_option
        if option is None:
            pairs = {head: head for head in setup.heads}
        elif isinstance(option, Mapping):
            pairs = dict(option)
        else:
            pairs = {head: head for head in option}
        if not pairs:
            raise setup.error("heads: distils no head")
        for head, teacher in pairs.items():
            setup.head(head, option="heads")
            if teacher not in setup.teachers:
                how = ("give heads: {head: teacher} to distil a head from a teacher of another name"
                       if head == teacher else "")
                raise setup.error(f"heads: student head {head!r} is distilled from teacher {teacher!r}, but the "
                                  f"run's teachers are {list(setup.teachers)}" + (f"; {how}" if how else ""))
            if setup.heads[head] != setup.teachers[teacher]:
                raise setup.error(f"student head {head!r} has {setup.heads[head]} classes but teacher {teacher!r} "
                                  f"has {setup.teachers[teacher]}")
        self.head_names = list(pairs)
        stream = setup.stream(self.data)
        self.splits = [setup.heads[h] for h in self.head_names]
        self.temperatures = per_head(setup, "temperature", self.temperature_option, self.head_names)
        self.weights_per_head = per_head(setup, "head_weights", self.head_weights_option, self.head_names)
        self.backend = setup.loss_backend
        self.student_key = setup.need(StudentLogits(stream, tuple(self.head_names)))
        self.teacher_key = setup.need(TeacherLogits(stream, tuple(pairs.values())))

    def forward(self, step: StepInputs) -> torch.Tensor:
        return multihead_kd_loss(step[self.student_key], step[self.teacher_key], splits=self.splits,
                                 temperature=self.temperatures, weights=self.weights_per_head,
                                 reduction="batchmean", backend=self.backend)

    def parts(self, step: StepInputs) -> dict[str, torch.Tensor]:
        student, teacher = step[self.student_key], step[self.teacher_key]
        out, start = {}, 0
        for head, size, tau, weight in zip(self.head_names, self.splits, self.temperatures, self.weights_per_head):
            cols = slice(start, start + size)
            start += size
            out[head] = multihead_kd_loss(student[:, cols], teacher[:, cols], temperature=tau, weights=[weight],
                                          backend=self.backend)
        return out
