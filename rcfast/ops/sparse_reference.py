"""Pure-PyTorch reference of the top-k (sparse-teacher) multi-head KD loss, and
the check of a sparse teacher's indices.

The teacher of head ``h`` is given as its top-k logits ``values[:, h, :]`` at
class indices ``indices[:, h, :]`` (within the head). Its distribution is
``p = softmax(values / tau)`` over those k entries and 0 on every other class;
an entry whose value is ``-inf`` is padding (p = 0, its index is never read),
so a head with fewer than k classes pads. Per row::

    loss = sum_h w_h * tau_h**2 * sum_j p_j * (log p_j - log softmax(s_h / tau_h)[idx_j])

With k = C_h and indices ``0 .. C_h - 1`` this is exactly the dense loss of
:mod:`rcfast.ops.reference`, and the same rules hold for non-finite values:
padding adds nothing, not even where the student is ``-inf``; a student ``-inf``
under teacher mass gives ``+inf``; a head whose entries are all padding adds 0
(NaN if the student has a NaN there); NaN in (student head or teacher value)
gives NaN out. Written for clarity, like the dense reference: float32 math
(float64 stays float64, for gradcheck), autograd for the gradient.

This module is the ground truth every sparse kernel backend is tested against,
so it refuses what the kernels would not define: :func:`check_sparse_teacher`
(indices in range, no index twice in a (row, head)) runs on every call.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["check_sparse_teacher", "sparse_reference_row_losses", "sparse_teacher_log_probs"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _first_position(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def check_sparse_teacher(teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                         head_sizes: Sequence[int]) -> None:
    """Check that every non-padding entry of a sparse teacher is a valid, distinct class.

    ``teacher_values``/``teacher_indices`` are ``[B, H, k]``; entries whose value
    is ``-inf`` are padding and are not checked. Raises a ``ValueError`` naming
    ``teacher_indices`` and the first offending (row, head, entry): an index
    outside ``[0, C_h)``, or one that appears twice in a (row, head) (which is
    also what more non-padding entries than the head has classes amounts to).

    Reads the indices (a host synchronisation on a GPU). Under ``torch.compile``
    the same checks are traced as asynchronous asserts (``RuntimeError``).
    """
    device = teacher_indices.device
    num_heads = teacher_indices.shape[1]
    sizes = torch.tensor(list(head_sizes), dtype=torch.int64, device=device).view(1, num_heads, 1)
    index = teacher_indices.to(torch.int64)
    is_entry = ~torch.isneginf(teacher_values)
    out_of_range = is_entry & ((index < 0) | (index >= sizes))

    # Duplicates: sort each (row, head)'s indices, padding replaced by distinct
    # negative sentinels, and look for equal neighbours.
    k = index.shape[2]
    sentinels = -1 - torch.arange(k, device=device, dtype=torch.int64).view(1, 1, k)
    ordered, _ = torch.sort(torch.where(is_entry, index, sentinels), dim=2)
    repeated = (ordered[:, :, 1:] == ordered[:, :, :-1]) & (ordered[:, :, 1:] >= 0)

    if torch.compiler.is_compiling():
        torch._assert_async(~out_of_range.any(), "rcfast: teacher_indices out of range [0, C_h) of its head")
        torch._assert_async(~repeated.any(), "rcfast: teacher_indices repeat a class within a (row, head)")
        return
    if bool(out_of_range.any()):
        row, head, entry = _first_position(out_of_range)
        raise ValueError(
            f"teacher_indices[{row}, {head}, {entry}] = {int(index[row, head, entry])} is out of range: "
            f"head {head} has {head_sizes[head]} classes (indices are within the head, 0 .. "
            f"{head_sizes[head] - 1}; pad unused entries with a teacher value of -inf)")
    if bool(repeated.any()):
        row, head, _ = _first_position(repeated)
        entries = int(is_entry[row, head].sum())
        if entries > head_sizes[head]:
            raise ValueError(
                f"teacher_indices: row {row}, head {head} has {entries} non-padding entries but the head "
                f"has only {head_sizes[head]} classes (k = {k} > C_h needs at least {k - head_sizes[head]} "
                "entries padded with a teacher value of -inf)")
        values, counts = torch.unique(index[row, head][is_entry[row, head]], return_counts=True)
        duplicate = int(values[counts > 1][0])
        raise ValueError(
            f"teacher_indices: class {duplicate} appears more than once in row {row}, head {head}; "
            "each (row, head) must list distinct classes")


def sparse_teacher_log_probs(scaled_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, fully_masked)`` of teacher entries ``values / tau`` (``[..., k]``).

    Padding (``-inf``) gets ``log p = -inf``; a (row, head) whose entries are all
    padding has no distribution: its entries get ``log p = -inf`` too and
    ``fully_masked`` (``[..., 1]``) is True there.
    """
    fully_masked = torch.isneginf(scaled_values).all(dim=-1, keepdim=True)
    log_p = torch.log_softmax(torch.where(fully_masked, 0.0, scaled_values), dim=-1)
    return torch.where(fully_masked, float("-inf"), log_p), fully_masked


def sparse_reference_row_losses(
    student: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    head_sizes: Sequence[int],
    temperatures: Sequence[float],
    weights: Sequence[float],
) -> torch.Tensor:
    """Per-row loss ``[B]`` summed over heads; differentiable w.r.t. ``student``.

    ``student`` is ``[B, sum(head_sizes)]`` packed; ``teacher_values`` and
    ``teacher_indices`` are ``[B, H, k]`` (checked with
    :func:`check_sparse_teacher`). The teacher is detached: it is a target.
    """
    check_sparse_teacher(teacher_values, teacher_indices, head_sizes)
    compute_dtype = _compute_dtype(student.dtype)
    rows = None
    first = 0
    for h, (size, tau, w) in enumerate(zip(head_sizes, temperatures, weights)):
        x_student = student[:, first:first + size].to(compute_dtype) / tau
        first += size
        x_teacher = teacher_values[:, h, :].detach().to(compute_dtype) / tau
        log_p_teacher, teacher_masked = sparse_teacher_log_probs(x_teacher)
        # Degenerate student heads as in the dense reference: zeros in place of an
        # all -inf head so that no NaN enters the graph, then the loss set explicitly.
        student_empty = torch.isneginf(x_student).all(dim=1, keepdim=True)
        student_nan = torch.isnan(x_student).any(dim=1)
        log_q = torch.log_softmax(torch.where(student_empty, 0.0, x_student), dim=1)

        is_entry = ~torch.isneginf(x_teacher)
        index = torch.where(is_entry, teacher_indices[:, h, :].to(torch.int64), 0)  # padding: any index
        log_q_at = log_q.gather(1, index)
        p_teacher = log_p_teacher.exp()
        # p = 0 (padding, or a weight that underflows) adds nothing, even where the
        # student is -inf too; NaN stays NaN (NaN != 0).
        pointwise = torch.where(p_teacher != 0, p_teacher * (log_p_teacher - log_q_at),
                                torch.zeros((), dtype=compute_dtype, device=student.device))
        kl = pointwise.sum(dim=1)
        kl = torch.where(student_empty.squeeze(1), float("inf"), kl)
        # A head of padding only adds 0, unless the student brings a NaN.
        masked_value = torch.where(student_nan, float("nan"), 0.0).to(compute_dtype)
        kl = torch.where(teacher_masked.squeeze(1), masked_value, kl)
        head_loss = (w * tau * tau) * kl
        rows = head_loss if rows is None else rows + head_loss
    return rows
