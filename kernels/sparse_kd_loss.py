"""Triton kernel of the multi-head KD loss against a top-k (sparse) teacher.

This module owns the ``@triton.jit`` kernel and the host function
:func:`sparse_kd_head_losses` that launches it; the ``torch.library`` op around
it is :mod:`rcfast.ops.sparse_triton_backend`. The math and the ``-inf``/NaN
rules are the dense kernel's (:mod:`rcfast.kernels.kd_loss`, whose tiling and
scaling helpers are reused), with the teacher given per (row, head) as k
logits ``values`` at class indices ``indices`` (within the head), ``-inf``
values marking padding.

One program per (row, head):

- the teacher, in ``BLOCK_K``-wide chunks of its k entries: running max and
  ``l_t = sum exp(v/tau - m_t)``;
- the student, streamed once over the head's classes in ``BLOCK`` tiles: running
  max and ``l_s`` (no dense teacher is read);
- ``KL = sum_j p_j (log p_j - log q_j)`` over the entries, gathering the student
  at their indices, each log-probability relative to its own max (the dense
  kernel's ``A / l_t - lse_t + lse_s`` would cancel large terms, e.g. a teacher
  logit near float's maximum against ordinary student logits);
- with ``COMPUTE_GRAD``, the gradient ``coef * softmax(s/tau)`` is written over
  the whole head, then (after a barrier: other threads of the program wrote
  those addresses) overwritten at the k entries by ``coef * (softmax(s/tau)[idx] - P)``,
  where ``P`` sums ``p`` over the entries that share the index (so repeated
  indices, which the front end can reject with ``validate=True``, still give
  the gradient of the loss computed; repeated lanes store the same value).

An index outside ``[0, C_h)`` of an entry that is not padding is never
dereferenced: that (row, head) gets a NaN loss and gradient (the op cannot raise
without a host synchronisation; ``validate=True`` gives the error instead).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .kd_loss import (
    ALIGN, NEG_INF, _grad_scale, _launch_context, _segments, _shift, block_and_warps,
)

__all__ = ["sparse_kd_head_losses", "entry_block"]

MAX_BLOCK_K = 64


@triton.jit
def _student_tile(s_ptr, offs, lo, hi, tau, m_s, l_s, MASKED: tl.constexpr):
    """Fold one tile of student logits into the running ``(m_s, l_s)``."""
    if MASKED:
        x_s = tl.load(s_ptr + offs, mask=(offs >= lo) & (offs < hi), other=NEG_INF).to(tl.float32) / tau
    else:
        x_s = tl.load(s_ptr + offs).to(tl.float32) / tau
    new_m_s = tl.maximum(m_s, tl.max(x_s, axis=0))
    shift = tl.where(new_m_s == NEG_INF, 0.0, new_m_s)
    # A NaN logit makes l_s NaN (exp(NaN) = NaN), which the KL keeps.
    l_s = l_s * tl.exp(m_s - shift) + tl.sum(tl.exp(x_s - shift), axis=0)
    return new_m_s, l_s


@triton.jit
def _student_stats(s_ptr, lo, hi, tau, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Online ``(m_s, l_s)`` of ``x = s / tau`` over elements ``[lo, hi)``."""
    m_s = tl.full((), NEG_INF, tl.float32)
    l_s = tl.full((), 0.0, tl.float32)
    body_lo, body_hi = _segments(lo, hi, BLOCK, ALIGN)
    if lo < body_lo:
        m_s, l_s = _student_tile(s_ptr, body_lo - ALIGN + tl.arange(0, ALIGN), lo, hi, tau, m_s, l_s, True)
    for start in range(body_lo, body_hi, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), ALIGN), BLOCK)
        m_s, l_s = _student_tile(s_ptr, offs, lo, hi, tau, m_s, l_s, False)
    if body_hi < hi:
        m_s, l_s = _student_tile(s_ptr, body_hi + tl.arange(0, BLOCK), lo, hi, tau, m_s, l_s, True)
    return m_s, l_s


@triton.jit
def _load_entries(values_ptr, indices_ptr, s_head_ptr, offs, k, head_size, tau):
    """One chunk of teacher entries: ``(v / tau, index, usable, bad, s[index] / tau)``.

    ``usable``: a real entry (not padding, not past k) with an index in range;
    ``bad``: a real entry whose index is out of range (never dereferenced).
    """
    in_k = offs < k
    x_t = tl.load(values_ptr + offs, mask=in_k, other=NEG_INF).to(tl.float32) / tau
    index = tl.load(indices_ptr + offs, mask=in_k, other=0).to(tl.int64)
    is_entry = x_t != NEG_INF  # True for NaN too: a NaN value is an entry
    in_range = (index >= 0) & (index < head_size)
    usable = is_entry & in_range
    x_s = tl.load(s_head_ptr + index, mask=usable, other=0.0).to(tl.float32) / tau
    return x_t, index, usable, is_entry & (~in_range), x_s


@triton.jit
def _sparse_kd_kernel(
    student_ptr, values_ptr, indices_ptr, grad_ptr, head_offsets_ptr, temperatures_ptr, weights_ptr,
    head_loss_ptr, n_cols, n_rows, n_heads, k,
    REDUCTION: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """One program per (row, head): loss to ``head_loss[row, head]``, gradient to the head's columns."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    begin = tl.load(head_offsets_ptr + head)
    end = tl.load(head_offsets_ptr + head + 1)
    head_size = end - begin
    tau = tl.load(temperatures_ptr + head)
    weight = tl.load(weights_ptr + head)
    s_head = student_ptr + row * n_cols + begin
    entries = (row * n_heads + head) * k
    v_row = values_ptr + entries
    i_row = indices_ptr + entries

    # Teacher: online (m_t, l_t) over the k entries, in chunks.
    m_t = tl.full((), NEG_INF, tl.float32)
    l_t = tl.full((), 0.0, tl.float32)
    num_bad = tl.full((), 0, tl.int32)
    for j0 in range(0, k, BLOCK_K):
        offs = j0 + tl.arange(0, BLOCK_K)
        in_k = offs < k
        x_t = tl.load(v_row + offs, mask=in_k, other=NEG_INF).to(tl.float32) / tau
        index = tl.load(i_row + offs, mask=in_k, other=0).to(tl.int64)
        num_bad += tl.sum(((x_t != NEG_INF) & ((index < 0) | (index >= head_size))).to(tl.int32), axis=0)
        new_m_t = tl.maximum(m_t, tl.max(x_t, axis=0))
        shift = tl.where(new_m_t == NEG_INF, 0.0, new_m_t)
        # A NaN value makes l_t NaN (exp(NaN) = NaN), whatever the max did with it.
        l_t = l_t * tl.exp(m_t - shift) + tl.sum(tl.exp(x_t - shift), axis=0)
        m_t = new_m_t

    # Student: one streaming pass over the head.
    m_s, l_s = _student_stats(student_ptr, row * n_cols + begin, row * n_cols + end, tau, BLOCK, ALIGN)
    shift_s = _shift(m_s)
    log_l_s = tl.log(l_s)
    log_l_s = tl.where(log_l_s == NEG_INF, 0.0, log_l_s)  # student -inf everywhere: q = 0
    shift_t = _shift(m_t)
    no_teacher_mass = l_t == 0.0  # padding only: no loss, no gradient
    log_l_t = tl.where(no_teacher_mass, 0.0, tl.log(l_t))

    # KL = sum_j p_j (log p_j - log q_j) over the entries, each log-probability
    # relative to its own max: nothing large cancels.
    kl = tl.full((), 0.0, tl.float32)
    for j0 in range(0, k, BLOCK_K):
        x_t, index, usable, bad, x_s = _load_entries(v_row, i_row, s_head, j0 + tl.arange(0, BLOCK_K), k,
                                                     head_size, tau)
        log_p = (x_t - shift_t) - log_l_t
        p = tl.exp(log_p)
        log_q = (x_s - shift_s) - log_l_s
        # p = 0 (padding, underflow) adds nothing, even against a student -inf; NaN stays NaN.
        kl += tl.sum(tl.where(p == 0.0, 0.0, p * (log_p - log_q)), axis=0)
    kl = tl.where(l_s == 0.0, float("inf"), kl)
    # A head of padding only adds 0, unless the student has a NaN (then l_s is NaN).
    kl = tl.where(no_teacher_mass, tl.where(l_s != l_s, l_s, 0.0), kl)
    kl = tl.where(num_bad > 0, float("nan"), kl)
    tl.store(head_loss_ptr + row * n_heads + head, weight * tau * tau * kl)

    if COMPUTE_GRAD:
        coef = _grad_scale(n_rows, n_heads, REDUCTION) * weight * tau
        nan_head = kl != kl
        g_head = grad_ptr + row * n_cols + begin
        # coef * softmax(s / tau) over the head, a tile at a time (unaligned: written once).
        for c0 in range(0, head_size, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            in_head = cols < head_size
            x = tl.load(s_head + cols, mask=in_head, other=NEG_INF).to(tl.float32) / tau
            g = coef * tl.exp((x - shift_s) - log_l_s)
            g = tl.where(no_teacher_mass, 0.0, g)
            g = tl.where(nan_head, float("nan"), g)
            tl.store(g_head + cols, g.to(g_head.dtype.element_ty), mask=in_head)
        # The entries' addresses were written by other threads of this program.
        tl.debug_barrier()
        for j0 in range(0, k, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            x_t, index, usable, bad, x_s = _load_entries(v_row, i_row, s_head, offs_j, k, head_size, tau)
            # P[j] = sum of p over the entries with index[j] (itself included).
            mass = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for i0 in range(0, k, BLOCK_K):
                offs_i = i0 + tl.arange(0, BLOCK_K)
                in_k = offs_i < k
                x_ti = tl.load(v_row + offs_i, mask=in_k, other=NEG_INF).to(tl.float32) / tau
                index_i = tl.load(i_row + offs_i, mask=in_k, other=-1).to(tl.int64)
                p_i = tl.exp((x_ti - shift_t) - log_l_t)
                same = index[:, None] == index_i[None, :]
                mass += tl.sum(tl.where(same & (x_ti[None, :] != NEG_INF), p_i[None, :], 0.0), axis=1)
            q = tl.exp((x_s - shift_s) - log_l_s)
            g = coef * (q - mass)
            g = tl.where(no_teacher_mass, 0.0, g)
            g = tl.where(nan_head, float("nan"), g)
            tl.store(g_head + index, g.to(g_head.dtype.element_ty), mask=usable)


def entry_block(k: int) -> int:
    """Entries per chunk: the next power of two of k, between 16 and :data:`MAX_BLOCK_K`."""
    return min(max(triton.next_power_of_2(max(int(k), 1)), 16), MAX_BLOCK_K)


def sparse_kd_head_losses(
    student: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    head_offsets: torch.Tensor,
    temperatures: torch.Tensor,
    weights: torch.Tensor,
    reduction: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: ``(head_losses [B, H] float32, grad)``.

    ``head_losses[b, h] = w_h * tau_h**2 * KL_h(row b)``; ``grad`` is the
    gradient of the reduced loss (``reduction`` selects its scale) in the
    student's dtype, ``[B, N]``, or an empty ``[0]`` tensor without
    ``compute_grad``. Inputs as in :mod:`rcfast.ops.sparse_contract`
    (contiguous, on one device).
    """
    num_rows, num_cols = student.shape
    num_heads = head_offsets.shape[0] - 1
    k = teacher_values.shape[2]
    device = student.device
    block, num_warps = block_and_warps(num_cols - (num_heads - 1))
    head_losses = torch.empty((num_rows, num_heads), dtype=torch.float32, device=device)
    grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    with _launch_context(device):
        wrap_triton(_sparse_kd_kernel)[(num_rows, num_heads)](
            student, teacher_values, teacher_indices, grad if compute_grad else student, head_offsets,
            temperatures, weights, head_losses, num_cols, num_rows, num_heads, k,
            REDUCTION=reduction, COMPUTE_GRAD=compute_grad, BLOCK=block, BLOCK_K=entry_block(k), ALIGN=ALIGN,
            num_warps=num_warps,
        )
    return head_losses, grad
