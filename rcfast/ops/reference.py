"""Pure-PyTorch reference of the multi-head softened-KL loss.

This is the ground truth every kernel backend is tested against, so it is written
for clarity, not speed: one head at a time, float32 math (float64 stays float64,
for gradcheck), autograd for the gradient.

Per row and head h with temperature tau_h and weight w_h:

    loss_h = w_h * tau_h**2 * KL( softmax(t_h / tau_h) || softmax(s_h / tau_h) )

A teacher logit of -inf has probability 0 and contributes nothing (torch's own
``kl_div`` would give ``0 * inf = NaN`` there, hence the explicit ``where``); a
student -inf where the teacher logit is finite gives +inf. NaN in gives NaN
out, and so does a +inf logit (the softmax is undefined).

Everything is kept in logit units: the logits are shifted by their (row, head)
maximum (the softmax does not change), and ``tau * log_softmax(v / tau)`` is
formed as ``v - tau * logsumexp(v / tau)``, so neither ``s / tau`` nor the KL
``tau * (...)`` of a large logit over a small temperature overflows before the
final ``w * tau * (tau * KL)``.

A head of weight 0 adds exactly 0 (also where its KL is +inf), unless it has a NaN.

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
        s = s.to(compute_dtype)
        t = t.detach().to(compute_dtype)
        # Degenerate heads (see the module docstring): replace their logits by
        # zeros before the softmax so that no NaN enters the graph, then set the
        # head's loss explicitly.
        teacher_masked = torch.isneginf(t).all(dim=1, keepdim=True)
        student_empty = torch.isneginf(s).all(dim=1, keepdim=True)
        student_nan = torch.isnan(s).any(dim=1)
        # A student -inf under a finite teacher logit: p_t > 0 there, KL = +inf
        # (decided on the logits, not on whether p_t underflows).
        student_inf = (torch.isneginf(s) & (t > float("-inf"))).any(dim=1)
        v_teacher = torch.where(teacher_masked, 0.0, _shifted(t))
        v_student = torch.where(student_empty, 0.0, _shifted(s))
        # tau * log_softmax(v / tau), in logit units: no overflow of v / tau.
        scaled_log_p_student = v_student - tau * torch.logsumexp(v_student / tau, dim=1, keepdim=True)
        scaled_log_p_teacher = v_teacher - tau * torch.logsumexp(v_teacher / tau, dim=1, keepdim=True)
        p_teacher = torch.exp(scaled_log_p_teacher / tau)
        # Where the teacher's probability is 0 the term is 0, even if the student's
        # log-probability is -inf there too (masked classes). NaN stays NaN.
        pointwise = torch.where(
            p_teacher != 0,
            p_teacher * (scaled_log_p_teacher - scaled_log_p_student),
            torch.zeros((), dtype=compute_dtype, device=s.device),
        )
        kl_times_tau = pointwise.sum(dim=1)
        # Added, not substituted, so the gradient of such a row stays the formula's
        # (coef * (p_s - p_t)), as the kernels give it.
        kl_times_tau = kl_times_tau + torch.where(student_inf, float("inf"), 0.0)
        # A fully masked head adds 0, unless the student brings a NaN: NaN in, NaN out.
        masked_value = torch.where(student_nan, float("nan"), 0.0).to(compute_dtype)
        kl_times_tau = torch.where(teacher_masked.squeeze(1), masked_value, kl_times_tau)
        if w == 0:
            # A head of weight 0 is switched off: exactly 0, even where its KL is
            # +inf (0 * inf would be NaN); a NaN still propagates.
            head_loss = torch.where(torch.isnan(kl_times_tau), kl_times_tau, 0.0)
        else:
            head_loss = (w * tau) * kl_times_tau
        rows = head_loss if rows is None else rows + head_loss
    return rows


def _shifted(logits: torch.Tensor) -> torch.Tensor:
    """``logits - max`` per row, the max detached (the softmax is shift-invariant).

    Rows whose max is -inf (all masked) are left as they are, for the caller.
    A row with a +inf logit has no softmax: it becomes NaN everywhere, like a row
    with a NaN, so that its loss and its whole gradient are NaN (as in the
    kernels), not only the entries autograd happens to reach.
    """
    row_max = logits.detach().amax(dim=1, keepdim=True)
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    shift = torch.where(torch.isposinf(row_max), float("nan"), shift)
    return logits - shift


def reduce_row_losses(rows: torch.Tensor, reduction: str, num_heads: int) -> torch.Tensor:
    """Apply one of ``none | sum | mean | batchmean`` to per-row losses ``[B]``."""
    scale = reduction_scale(reduction, rows.shape[0], num_heads)
    if reduction == "none":
        return rows
    return rows.sum() * scale
