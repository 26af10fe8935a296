"""Pure-PyTorch reference of the top-k (sparse-teacher) multi-head KD loss, and
the check of a sparse teacher's indices.

The teacher of head ``h`` is given as its top-k logits ``values[:, h, :]`` at
class indices ``indices[:, h, :]`` (within the head). Its distribution is
``p = softmax(values / tau)`` over those k entries and 0 on every other class;
an entry whose value is ``-inf`` is padding (p = 0, its index is never read),
so a head with fewer than k classes pads. Per row::

    loss = sum_h w_h * tau_h**2 * sum_j p_j * (log p_j - log softmax(s_h / tau_h)[idx_j])

That is exactly the dense loss of :mod:`rcfast.ops.reference` against a dense
teacher equal to the values at the indices and ``-inf`` elsewhere (p is 0
there): the reference builds that teacher (:func:`sparse_teacher_to_dense`) and
runs the dense reference, so both ops share every rule for non-finite values,
degenerate heads and weight-0 heads by construction. With k = C_h and indices
``0 .. C_h - 1`` it is the dense loss itself.

This module is the ground truth every sparse kernel backend is tested against,
so it refuses what the kernels leave undefined: :func:`check_sparse_teacher`
(indices in range, no index twice in a (row, head)) runs on every call.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rcfast.ops.reference import reference_row_losses

__all__ = ["check_sparse_teacher", "sparse_reference_row_losses", "sparse_teacher_to_dense"]


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

    # Repeats: sort each (row, head)'s indices, padding replaced by distinct
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


def sparse_teacher_to_dense(teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                            head_offsets: torch.Tensor, num_cols: int) -> torch.Tensor:
    """The dense ``[B, num_cols]`` teacher a sparse one stands for: the values at
    their indices, ``-inf`` (p = 0) on every other class.

    ``head_offsets`` is the int64 ``[H + 1]`` table of the kernels (head h is
    columns ``o_h .. o_{h+1} - 1``, ``num_cols = o_H``); tensor ops only, so it
    also traces under torch.compile. Padding entries write nothing. Defined for
    any input: a repeated index keeps the largest of its values, and an index
    out of range makes its head NaN (so that it cannot pass for a valid
    teacher). ``O(B * N)`` memory: for the reference and the double backward,
    never for the kernels.
    """
    batch = teacher_values.shape[0]
    offsets = head_offsets[:-1].view(1, -1, 1)
    sizes = (head_offsets[1:] - head_offsets[:-1]).view(1, -1, 1)
    index = teacher_indices.to(torch.int64)
    is_entry = ~torch.isneginf(teacher_values)
    in_range = (index >= 0) & (index < sizes)
    columns = offsets + torch.where(is_entry & in_range, index, 0)
    nan = torch.full_like(teacher_values, float("nan"))
    values = torch.where(is_entry, torch.where(in_range, teacher_values, nan), float("-inf"))
    dense = torch.full((batch, num_cols), float("-inf"), dtype=teacher_values.dtype, device=teacher_values.device)
    return dense.scatter_reduce(1, columns.reshape(batch, -1), values.reshape(batch, -1), reduce="amax",
                                include_self=True)


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
    offsets = [0]
    for size in head_sizes:
        offsets.append(offsets[-1] + size)
    head_offsets = torch.tensor(offsets, dtype=torch.int64, device=student.device)
    teacher = sparse_teacher_to_dense(teacher_values.detach(), teacher_indices, head_offsets, offsets[-1])
    return reference_row_losses(torch.split(student, list(head_sizes), dim=1),
                                torch.split(teacher, list(head_sizes), dim=1), temperatures, weights)
