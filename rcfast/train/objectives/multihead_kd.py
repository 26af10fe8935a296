"""``multihead_kd``: softened-KL distillation of teachers into student heads, fused over all heads.

Options (YAML ``{term: multihead_kd, ...}``):

- ``heads``: which student heads to distil and from which teacher. ``null``
  (default): every student head, each from the teacher of the same name;
  a list of heads (each from its same-named teacher); or ``{head: teacher}``.
- ``temperature``: one float for all heads or ``{head: float}`` (default 4.0).
- ``head_weights``: one float >= 0 or ``{head: float}`` (default 1.0), inside the
  term (the entry's ``weight`` scales the whole term).
- ``data``: the data stream (default ``proxy``).
- ``fused_linear``: ``true`` to fuse the student's packed head into the loss
  (:func:`rcfast.fused_linear_multihead_kd_loss`): the term reads the
  backbone's features and the head's weight and bias, and when no other term
  reads the student's logits they are never made (nor their gradient) -- for
  heads of tens of thousands of classes. Same loss up to float rounding. From
  a top-k teacher cache the teacher is densified first (``-inf``, or the tail's
  fill, outside the k: ``B x sum(C)`` floats, as online teachers give). Default
  ``false``.

Loss: :func:`rcfast.multihead_kd_loss` with ``reduction="batchmean"`` on the
run's ``train.loss_backend``; per-head values are logged as parts. The
teachers may come as their top-k logits (a top-k teacher cache,
:class:`~rcfast.train.sparse_teacher.SparseTeacherLogits`): the loss is then the
top-k loss, the teacher's softmax over its k entries and 0 elsewhere, computed by the
fused :func:`rcfast.sparse_multihead_kd_loss` (no dense teacher is built). A
cache built with its tail mass also gives each teacher's ``fill`` logit for the
classes outside its k: the term then builds the dense teacher
(``SparseTeacherLogits.to_dense``, ``B x sum(C)`` floats) and uses the dense
fused loss, whose target keeps the tail's mass (at the temperature the cache was
built for, which must be the term's).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from rcfast.ops.fused_linear_kd import fused_linear_multihead_kd_loss
from rcfast.ops.multihead_kd import multihead_kd_loss
from rcfast.ops.sparse_kd import sparse_multihead_kd_loss
from rcfast.train.objectives.base import Term, TermSetup, register_term
from rcfast.train.objectives.inputs import (STUDENT_FEATURES, StepInputs, StudentHeadLinear, StudentLayer,
                                            StudentLogits, TeacherLogits)
from rcfast.train.sparse_teacher import SparseTeacherLogits

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


def _kd_loss(student: torch.Tensor, teacher, **options) -> torch.Tensor:
    """The fused KD loss against dense packed teacher logits, or against top-k ones (with or without a tail)."""
    if isinstance(teacher, SparseTeacherLogits) and teacher.fill is not None:
        # Every class outside the k has the fill logit: a dense target (the top-k loss would drop the tail).
        return multihead_kd_loss(student, teacher.to_dense(torch.float32), **options)
    if isinstance(teacher, SparseTeacherLogits):
        # The fused top-k op reads the k stored logits per head and never builds the dense teacher
        # (which is the reference semantics: -inf, p = 0, outside the top k; see to_dense).
        return sparse_multihead_kd_loss(student, teacher.values, teacher.indices.to(torch.int32), **options)
    return multihead_kd_loss(student, teacher, **options)


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
                 head_weights: float | dict = 1.0, data: str | None = None, fused_linear: bool = False) -> None:
        super().__init__()
        if not isinstance(fused_linear, bool):
            raise TypeError(f"fused_linear must be true or false, got {fused_linear!r}")
        self.fused_linear = fused_linear
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
        self.teacher_names = list(pairs.values())
        stream = setup.stream(self.data)
        self.splits = [setup.heads[h] for h in self.head_names]
        self.temperatures = per_head(setup, "temperature", self.temperature_option, self.head_names)
        self.weights_per_head = per_head(setup, "head_weights", self.head_weights_option, self.head_names)
        self.backend = setup.loss_backend
        if self.fused_linear:
            # The features entering the packed head, and the head's rows of the distilled heads.
            self.features_key = setup.need(StudentLayer(stream, STUDENT_FEATURES))
            self.student_key = setup.need(StudentHeadLinear(stream, tuple(self.head_names)))
        else:
            self.student_key = setup.need(StudentLogits(stream, tuple(self.head_names)))
        self.teacher_key = setup.need(TeacherLogits(stream, tuple(pairs.values()), accepts_top_k=True,
                                                    temperatures=self.temperatures))

    def _fused_linear_loss(self, step: StepInputs, rows: slice | None = None, **options) -> torch.Tensor:
        """The loss with the head fused in, over all distilled heads or the packed ``rows`` of one."""
        features = step[self.features_key]
        weight, bias = step[self.student_key]
        teacher = step[self.teacher_key]
        if isinstance(teacher, SparseTeacherLogits):
            # The fused linear op takes dense teacher logits: the dense teacher a top-k cache stands for.
            teacher = teacher.to_dense(features.dtype)
        if rows is not None:
            weight, teacher = weight[rows], teacher[:, rows]
            bias = None if bias is None else bias[rows]
        # As the head's nn.Linear under autocast: the parameters take the features' (autocast) dtype.
        weight = weight.to(features.dtype)
        bias = None if bias is None else bias.to(features.dtype)
        return fused_linear_multihead_kd_loss(features, weight, teacher.to(features.dtype), bias=bias,
                                              backend=self.backend, **options)

    def forward(self, step: StepInputs) -> torch.Tensor:
        if self.fused_linear:
            return self._fused_linear_loss(step, splits=self.splits, temperature=self.temperatures,
                                           weights=self.weights_per_head, reduction="batchmean")
        return _kd_loss(step[self.student_key], step[self.teacher_key], splits=self.splits,
                        temperature=self.temperatures, weights=self.weights_per_head,
                        reduction="batchmean", backend=self.backend)

    def parts(self, step: StepInputs) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for i, (head, size, tau, weight) in enumerate(zip(self.head_names, self.splits, self.temperatures,
                                                          self.weights_per_head)):
            cols = slice(start, start + size)
            start += size
            if self.fused_linear:
                out[head] = self._fused_linear_loss(step, cols, temperature=tau, weights=[weight])
                continue
            student, teacher = step[self.student_key], step[self.teacher_key]
            head_teacher = (teacher.select((self.teacher_names[i],)) if isinstance(teacher, SparseTeacherLogits)
                            else teacher[:, cols])
            out[head] = _kd_loss(student[:, cols], head_teacher, temperature=tau, weights=[weight],
                                 backend=self.backend)
        return out
