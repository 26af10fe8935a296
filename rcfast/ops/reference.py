"""Pure-PyTorch reference of the multi-head softened-KL loss.

This is the ground truth every kernel backend is tested against, so it is written
for clarity, not speed: one head at a time, float32 math (float64 stays float64,
for gradcheck), autograd for the gradient.

Per row and head h with temperature tau_h and weight w_h:

    loss_h = w_h * tau_h**2 * KL( softmax(t_h / tau_h) || softmax(s_h / tau_h) )

A teacher logit of -inf has probability 0 and contributes nothing (torch's own
``kl_div`` would give ``0 * inf = NaN`` there, hence the explicit ``where``); a
student -inf where the teacher has mass gives +inf. NaN in gives NaN out, and so
does a +inf logit (the softmax is undefined).

The logits are shifted by their (row, head) maximum before the division by the
temperature: ``(s - max s) / tau`` cannot overflow where ``s / tau`` would (a
large logit with a small temperature), and the softmax does not change.

Degenerate heads, where a softmax is undefined:

- teacher logits all -inf: no distribution to match; the head adds 0 (loss and
  gradient), or NaN if the student has a NaN there;
- student logits all -inf (teacher not fully masked): the loss is +inf; the
  gradient of such a row is unspecified (kernels give ``-w*tau*p_t``, this
  reference 0) and is not compared in tests.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rcfast.ops.kernel_contract import reduction_scale

__all__ = ["reference_row_losses", "reduce_row_losses"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 is kept for gradcheck; everything narrower is computed in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_row_losses(
    student_heads: Sequence[torch.Tensor],
    teacher_heads: Sequence[torch.Tensor],
    temperatures: Sequence[float],
    weights: Sequence[float],
) -> torch.Tensor:
    """Per-row loss ``[B]`` summed over heads; differentiable w.r.t. the student.

    Each ``student_heads[h]``/``teacher_heads[h]`` is ``[B, C_h]``. The teacher is
    detached: it is a target, never trained by this loss.
    """
    compute_dtype = _compute_dtype(student_heads[0].dtype)
    rows = None
    for s, t, tau, w in zip(student_heads, teacher_heads, temperatures, weights):
        x_student = _shifted(s.to(compute_dtype)) / tau
        x_teacher = _shifted(t.detach().to(compute_dtype)) / tau
        # Degenerate heads (see the module docstring): replace their logits by
        # zeros before the softmax so that no NaN enters the graph, then set the
        # head's loss explicitly.
        teacher_masked = torch.isneginf(x_teacher).all(dim=1, keepdim=True)
        student_empty = torch.isneginf(x_student).all(dim=1, keepdim=True)
        student_nan = torch.isnan(x_student).any(dim=1)
        x_teacher = torch.where(teacher_masked, 0.0, x_teacher)
        x_student = torch.where(student_empty, 0.0, x_student)

        log_p_student = torch.log_softmax(x_student, dim=1)
        log_p_teacher = torch.log_softmax(x_teacher, dim=1)
        p_teacher = log_p_teacher.exp()
        # Where the teacher's probability is 0 the term is 0, even if the student's
        # log-probability is -inf there too (masked classes). NaN stays NaN.
        pointwise = torch.where(
            p_teacher != 0,
            p_teacher * (log_p_teacher - log_p_student),
            torch.zeros((), dtype=compute_dtype, device=s.device),
        )
        kl = pointwise.sum(dim=1)
        kl = torch.where(student_empty.squeeze(1), float("inf"), kl)
        # A fully masked head adds 0, unless the student brings a NaN: NaN in, NaN out.
        masked_value = torch.where(student_nan, float("nan"), 0.0).to(compute_dtype)
        kl = torch.where(teacher_masked.squeeze(1), masked_value, kl)
        head_loss = (w * tau) * (tau * kl)
        rows = head_loss if rows is None else rows + head_loss
    return rows


def _shifted(logits: torch.Tensor) -> torch.Tensor:
    """``logits - max`` per row, the max detached (the softmax is shift-invariant).

    Rows whose max is -inf (all masked) or NaN are left as they are; the caller
    handles them.
    """
    row_max = logits.detach().amax(dim=1, keepdim=True)
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    return logits - shift


def reduce_row_losses(rows: torch.Tensor, reduction: str, num_heads: int) -> torch.Tensor:
    """Apply one of ``none | sum | mean | batchmean`` to per-row losses ``[B]``."""
    scale = reduction_scale(reduction, rows.shape[0], num_heads)
    if reduction == "none":
        return rows
    return rows.sum() * scale
