"""Deep model consolidation (DMC, arXiv 1903.07864): the double-distillation loss.

Two (or more) classifiers with disjoint classes -- an "old" model on classes A
and a "new" one on classes B -- are merged into one student over A u B on
unlabeled auxiliary data. The student regresses each teacher's logits centred
*per sample over that teacher's own classes*:

    target = concat_k ( t_k - t_k.mean(dim=1, keepdim=True) )
    loss   = mean over batch and classes of (s - target)^2

Centring removes each teacher's arbitrary per-sample offset, so logits of models
trained apart become comparable in one softmax. Note: a widely used
re-implementation centres over the *batch* instead (``targets.mean(0)``, one
offset per class); rcfast follows the paper and centres per sample over each
teacher's classes.

Teachers are given as one packed ``[B, sum(C_k)]`` tensor with ``splits`` or as a
list of ``[B, C_k]`` tensors. By default the student's columns are the teachers'
classes in order; ``classes`` places each teacher's classes at given student
columns instead (e.g. the global class ids of a class-incremental benchmark),
and then the class sets must be disjoint (a class claimed by two teachers is an
error).

Teachers are targets: they are detached. Half-precision inputs are computed in
float32, float64 stays float64; the loss is float32 or float64.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["DoubleDistillLoss", "double_distill_loss", "double_distill_target"]

TeacherLogits = torch.Tensor | Sequence[torch.Tensor]


def _check_logits(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must be [B, C] with B > 0 and C > 0, got shape {tuple(tensor.shape)}")


def _teacher_list(teacher_logits: TeacherLogits, splits: Sequence[int] | None) -> list[torch.Tensor]:
    """The teachers as a list of ``[B, C_k]`` tensors, checked against ``splits``."""
    if isinstance(teacher_logits, torch.Tensor):
        _check_logits("teacher_logits", teacher_logits)
        if splits is None:
            return [teacher_logits]
        splits = _check_splits(splits)
        if sum(splits) != teacher_logits.shape[1]:
            raise ValueError(f"splits {list(splits)} sum to {sum(splits)}, but teacher_logits has "
                             f"{teacher_logits.shape[1]} columns")
        return list(torch.split(teacher_logits, list(splits), dim=1))
    if not isinstance(teacher_logits, (list, tuple)) or len(teacher_logits) == 0:
        raise TypeError("teacher_logits must be a packed [B, sum(C_k)] tensor or a non-empty list of [B, C_k] tensors")
    for k, tensor in enumerate(teacher_logits):
        _check_logits(f"teacher_logits[{k}]", tensor)
        if tensor.shape[0] != teacher_logits[0].shape[0]:
            raise ValueError(f"teacher_logits[{k}] has {tensor.shape[0]} rows, teacher_logits[0] "
                             f"{teacher_logits[0].shape[0]}")
    if splits is not None and list(_check_splits(splits)) != [t.shape[1] for t in teacher_logits]:
        raise ValueError(f"splits {list(splits)} do not match the teachers' class counts "
                         f"{[t.shape[1] for t in teacher_logits]}")
    return list(teacher_logits)


def _check_splits(splits: Sequence[int]) -> tuple[int, ...]:
    if isinstance(splits, (str, bytes)) or not isinstance(splits, Sequence) or len(splits) == 0:
        raise ValueError(f"splits must be a non-empty sequence of class counts, got {splits!r}")
    for size in splits:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"splits must hold positive ints, got {list(splits)}")
    return tuple(splits)


def _check_classes(classes: Sequence[Sequence[int]], sizes: Sequence[int], num_columns: int) -> list[list[int]]:
    """Each teacher's student columns: in range, one per teacher class, disjoint."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or len(classes) != len(sizes):
        raise ValueError(f"classes must give one list of student columns per teacher ({len(sizes)}), got {classes!r}")
    out, owner = [], {}
    for k, (ids, size) in enumerate(zip(classes, sizes)):
        ids = list(ids)
        if len(ids) != size:
            raise ValueError(f"classes[{k}] lists {len(ids)} classes, but teacher {k} has {size} logits")
        for c in ids:
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < num_columns:
                raise ValueError(f"classes[{k}] holds {c!r}, not a student column in [0, {num_columns})")
            if c in owner:
                raise ValueError(f"classes: teachers were declared disjoint, but class {c} belongs to teacher "
                                 f"{owner[c]} and teacher {k}")
            owner[c] = k
        out.append(ids)
    # Disjoint, in range and sum(sizes) == num_columns: every column has exactly one teacher.
    return out


def double_distill_target(teacher_logits: TeacherLogits, splits: Sequence[int] | None = None,
                          classes: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """The regression target ``concat_k (t_k - mean_c t_k)`` (detached), ``[B, sum(C_k)]``.

    With ``classes`` the columns are placed at each teacher's student columns
    instead of concatenated in order.
    """
    teachers = _teacher_list(teacher_logits, splits)
    dtype = torch.float64 if teachers[0].dtype == torch.float64 else torch.float32
    centred = [t.detach().to(dtype) - t.detach().to(dtype).mean(dim=1, keepdim=True) for t in teachers]
    target = torch.cat(centred, dim=1)
    if classes is None:
        return target
    columns = _check_classes(classes, [t.shape[1] for t in teachers], target.shape[1])
    order = torch.tensor([c for ids in columns for c in ids], device=target.device)
    return torch.empty_like(target).index_copy_(1, order, target)


def double_distill_loss(student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                        splits: Sequence[int] | None = None,
                        classes: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """DMC's double-distillation loss: ``mean (s - target)^2`` over batch and classes.

    Args:
        student_logits: ``[B, N]``, the student over the union of the teachers' classes.
        teacher_logits: packed ``[B, N]`` with ``splits=[C_1, ..., C_K]``, or a
            list of ``K`` tensors ``[B, C_k]``; a single tensor without
            ``splits`` is one teacher.
        splits: classes per teacher in the packed tensor.
        classes: optional ``K`` lists of student columns, one per teacher class
            (the teachers' classes must be disjoint, so they cover the ``N`` columns);
            default: the teachers' classes side by side in order.

    See :func:`double_distill_target` for the target. The gradient flows to the
    student only: ``2 (s - target) / (B N)``.
    """
    _check_logits("student_logits", student_logits)
    target = double_distill_target(teacher_logits, splits, classes)
    if target.shape != student_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} must have the teachers' shape "
                         f"{tuple(target.shape)} (batch, total teacher classes)")
    if target.device != student_logits.device:
        raise ValueError(f"student_logits is on {student_logits.device}, teacher_logits on {target.device}")
    return (student_logits.to(target.dtype) - target).square().mean()


class DoubleDistillLoss(nn.Module):
    """The ``nn.Module`` form of :func:`double_distill_loss` with fixed ``splits`` and ``classes``."""

    def __init__(self, splits: Sequence[int] | None = None, classes: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        self.splits = None if splits is None else _check_splits(splits)
        if classes is not None:
            if self.splits is None:
                raise ValueError("classes needs splits (one class count per teacher)")
            classes = _check_classes(classes, self.splits, sum(self.splits))
        self.classes = classes

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits) -> torch.Tensor:
        return double_distill_loss(student_logits, teacher_logits, self.splits, self.classes)

    def extra_repr(self) -> str:
        return f"splits={self.splits}" + ("" if self.classes is None else f", classes={self.classes}")
