"""``OTDistillLoss``: distillation across label spaces through optimal transport.

Selective cross-task distillation (arXiv 2204.11526): the teacher predicts over
its own ``C_t`` classes, the student over its ``C_s`` classes, and a cost
matrix ``C [C_t, C_s]`` says how far each teacher class is from each student
class (given, or built by :func:`rcfast.select.class_cost_matrix` from class
prototypes). The loss of a row is the entropic transport cost

    ``OT_eps( softmax(t / tau), softmax(s / tau); C )``   (:func:`rcfast.ops.sinkhorn`)

-- the cheapest way to move the teacher's belief onto the student's, which is
small when the student puts its mass on the classes the teacher's classes map
to. The gradient reaches the student's logits through the implicit gradient
of the Sinkhorn solution; the teacher is a constant.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

from rcfast.ops.sinkhorn import solve_batch

__all__ = ["OTDistillLoss", "ot_distill_loss"]

REDUCTIONS = ("mean", "sum", "none")


def _check_cost(cost) -> torch.Tensor:
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"cost must be a [C_teacher, C_student] tensor, got {type(cost).__name__}")
    if not cost.is_floating_point() or cost.dim() != 2 or 0 in cost.shape:
        raise ValueError(f"cost must be a floating [C_teacher, C_student] tensor, got {cost.dtype} "
                         f"{tuple(cost.shape)}")
    if not torch.isfinite(cost).all():
        raise ValueError("cost must be finite")
    return cost


def _check_options(temperature, eps, max_iters, tol, reduction) -> None:
    for name, value in (("temperature", temperature), ("eps", eps)):
        if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")
    if not isinstance(tol, Real) or isinstance(tol, bool) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite float >= 0, got {tol!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def ot_distill_loss(student: torch.Tensor, teacher: torch.Tensor, cost: torch.Tensor, temperature: float = 1.0,
                    eps: float = 0.05, max_iters: int = 1000, tol: float = 1e-5,
                    reduction: str = "mean") -> torch.Tensor:
    """Per-row transport cost between softened teacher and student predictions (see the module).

    Args:
        student: ``[B, C_s]`` logits (float32/float16/bfloat16/float64).
        teacher: ``[B, C_t]`` logits (a constant: no gradient flows to it).
        cost: ``[C_t, C_s]`` finite costs (e.g. in [0, 1]; ``eps`` is in its units).
        temperature: softens both predictions (> 0).
        eps, max_iters, tol: of :func:`rcfast.ops.sinkhorn`.
        reduction: ``"mean"`` over rows (default), ``"sum"`` or ``"none"`` (``[B]``).

    Returns float32 (float64 for float64 inputs). NaN logits give NaN rows.
    """
    _check_options(temperature, eps, max_iters, tol, reduction)
    cost = _check_cost(cost)
    for name, logits in (("student", student), ("teacher", teacher)):
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
        if not logits.is_floating_point():
            raise TypeError(f"{name} must be floating-point logits, got {logits.dtype}")
        if logits.dim() != 2:
            raise ValueError(f"{name} must be [batch, classes], got shape {tuple(logits.shape)}")
    if student.shape[0] != teacher.shape[0] or student.shape[0] == 0:
        raise ValueError(f"student and teacher need the same non-zero batch, got {student.shape[0]} and "
                         f"{teacher.shape[0]}")
    if tuple(cost.shape) != (teacher.shape[1], student.shape[1]):
        raise ValueError(f"cost must be [C_teacher, C_student] = [{teacher.shape[1]}, {student.shape[1]}], got "
                         f"{tuple(cost.shape)}")
    if not (student.device == teacher.device == cost.device):
        raise ValueError(f"student, teacher and cost must be on one device, got {student.device}, "
                         f"{teacher.device} and {cost.device}")
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    target = torch.softmax(student.to(dtype) / temperature, dim=1)
    with torch.no_grad():
        source = torch.softmax(teacher.detach().to(dtype) / temperature, dim=1)
    rows = solve_batch(source, target, cost.to(dtype).unsqueeze(0), float(eps), max_iters, float(tol))
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


class OTDistillLoss(nn.Module):
    """The ``nn.Module`` form of :func:`ot_distill_loss` with a fixed cost matrix (a buffer).

    ``loss = OTDistillLoss(cost)`` with ``cost [C_teacher, C_student]``, then
    ``loss(student_logits, teacher_logits)``.
    """

    def __init__(self, cost: torch.Tensor, temperature: float = 1.0, eps: float = 0.05, max_iters: int = 1000,
                 tol: float = 1e-5, reduction: str = "mean") -> None:
        super().__init__()
        _check_options(temperature, eps, max_iters, tol, reduction)
        self.register_buffer("cost", _check_cost(cost).detach().clone())
        self.temperature, self.eps, self.max_iters, self.tol = float(temperature), float(eps), max_iters, float(tol)
        self.reduction = reduction

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return ot_distill_loss(student, teacher, self.cost, temperature=self.temperature, eps=self.eps,
                               max_iters=self.max_iters, tol=self.tol, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"classes={tuple(self.cost.shape)}, temperature={self.temperature}, eps={self.eps}, "
                f"max_iters={self.max_iters}, tol={self.tol}, reduction={self.reduction!r}")
