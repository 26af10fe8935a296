"""Triton kernel of the multi-head KD loss against a top-k (sparse) teacher.

This module owns the ``@triton.jit`` kernel and the host function
:func:`sparse_kd_head_losses` that launches it; the ``torch.library`` op around
it is :mod:`rcfast.ops.sparse_triton_backend`. The math is the dense kernel's
(:mod:`rcfast.kernels.kd_loss`, whose units, tiling, loss and gradient gating
helpers are reused): logits in their own units, exps ``2^((u - b) c)`` with
``c = log2(e) / tau``, and a head's loss ``w tau ((A / A_TERM_SCALE) / l_t +
tau ln(l_s / l_t))`` in float64 (``_head_loss``), with the teacher given per
(row, head) as k logits ``values`` at class indices ``indices`` (within the
head), ``-inf`` values marking padding.

One program per (row, head):

- the teacher, in ``BLOCK_K``-wide chunks of its k entries: running max and
  ``l_t``; the student, streamed once over the head's classes in ``BLOCK``
  tiles: running max and ``l_s`` (no dense teacher is read);
- ``A = sum_j e_j ((v_j - b_t) - (s_j - b_s))`` over the entries (gathering the
  student at their indices), relative to the final maxima, so it stays of the
  order of the KL; ``inf`` when a student ``-inf`` meets a finite value;
- with ``COMPUTE_GRAD``, the gradient ``coef * softmax(s/tau)`` is written over
  the whole head, then (after a barrier: other threads of the program wrote
  those addresses) overwritten at the k entries by ``coef * (softmax[idx] - P)``,
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
    A_TERM_SCALE, ALIGN, LOG2E, NEG_INF, _base, _grad_gate, _head_loss, _launch_context, _log2_sum, _segments,
    block_and_warps,
)

__all__ = ["sparse_kd_head_losses", "entry_block", "MAX_BLOCK_K"]

MAX_BLOCK_K = 64


@triton.jit
def _student_tile(s_ptr, offs, lo, hi, exp_scale, m_s, l_s, MASKED: tl.constexpr):
    """Fold one tile of student logits into the running ``(m_s, l_s)``."""
    if MASKED:
        u = tl.load(s_ptr + offs, mask=(offs >= lo) & (offs < hi), other=NEG_INF).to(tl.float32)
    else:
        u = tl.load(s_ptr + offs).to(tl.float32)
    new_m_s = tl.maximum(m_s, tl.max(u, axis=0))
    new_base = _base(new_m_s)
    alpha = tl.exp2((m_s - new_base) * exp_scale)
    # A NaN logit may be dropped by the max, never by the sum (2^NaN = NaN); a +inf
    # logit makes its own exp 2^(inf - inf) = NaN.
    l_s = tl.where((alpha == 0.0) & (l_s == l_s), 0.0, l_s * alpha)
    l_s += tl.sum(tl.exp2((u - new_base) * exp_scale), axis=0)
    return new_m_s, l_s


@triton.jit
def _student_stats(s_ptr, lo, hi, exp_scale, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Online ``(m_s, l_s)`` of the student over elements ``[lo, hi)``."""
    m_s = tl.full((), NEG_INF, tl.float32)
    l_s = tl.full((), 0.0, tl.float32)
    body_lo, body_hi = _segments(lo, hi, BLOCK, ALIGN)
    if lo < body_lo:
        m_s, l_s = _student_tile(s_ptr, body_lo - ALIGN + tl.arange(0, ALIGN), lo, hi, exp_scale, m_s, l_s, True)
    for start in range(body_lo, body_hi, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), ALIGN), BLOCK)
        m_s, l_s = _student_tile(s_ptr, offs, lo, hi, exp_scale, m_s, l_s, False)
    if body_hi < hi:
        m_s, l_s = _student_tile(s_ptr, body_hi + tl.arange(0, BLOCK), lo, hi, exp_scale, m_s, l_s, True)
    return m_s, l_s


@triton.jit
def _load_entries(values_ptr, indices_ptr, s_head_ptr, offs, k, head_size):
    """One chunk of teacher entries: ``(v, index, usable, bad, s[index])``.

    ``usable``: a real entry (not padding, not past k) with an index in range;
    ``bad``: a real entry whose index is out of range (never dereferenced).
    """
    in_k = offs < k
    v = tl.load(values_ptr + offs, mask=in_k, other=NEG_INF).to(tl.float32)
    index = tl.load(indices_ptr + offs, mask=in_k, other=0).to(tl.int64)
    is_entry = v != NEG_INF  # True for NaN too: a NaN value is an entry
    in_range = (index >= 0) & (index < head_size)
    usable = is_entry & in_range
    s = tl.load(s_head_ptr + index, mask=usable, other=0.0).to(tl.float32)
    return v, index, usable, is_entry & (~in_range), s


@triton.jit
def _sparse_kd_kernel(
    student_ptr, values_ptr, indices_ptr, grad_ptr, head_offsets_ptr, temperatures_ptr, weights_ptr,
    head_loss_ptr, n_cols, n_heads, k, grad_scale,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program per (row, head): loss to ``head_loss[row, head]``, gradient to the head's columns."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    begin = tl.load(head_offsets_ptr + head)
    end = tl.load(head_offsets_ptr + head + 1)
    head_size = end - begin
    tau = tl.load(temperatures_ptr + head)
    weight = tl.load(weights_ptr + head)
    exp_scale = LOG2E / tau
    s_head = student_ptr + row * n_cols + begin
    entries = (row * n_heads + head) * k
    v_row = values_ptr + entries
    i_row = indices_ptr + entries

    # Teacher: online (m_t, l_t) over the k entries, in chunks; bad indices counted.
    m_t = tl.full((), NEG_INF, tl.float32)
    l_t = tl.full((), 0.0, tl.float32)
    num_bad = tl.full((), 0, tl.int32)
    for j0 in range(0, k, BLOCK_K):
        offs = j0 + tl.arange(0, BLOCK_K)
        in_k = offs < k
        v = tl.load(v_row + offs, mask=in_k, other=NEG_INF).to(tl.float32)
        index = tl.load(i_row + offs, mask=in_k, other=0).to(tl.int64)
        num_bad += tl.sum(((v != NEG_INF) & ((index < 0) | (index >= head_size))).to(tl.int32), axis=0)
        new_m_t = tl.maximum(m_t, tl.max(v, axis=0))
        new_base = _base(new_m_t)
        alpha = tl.exp2((m_t - new_base) * exp_scale)
        l_t = tl.where((alpha == 0.0) & (l_t == l_t), 0.0, l_t * alpha)
        l_t += tl.sum(tl.exp2((v - new_base) * exp_scale), axis=0)
        m_t = new_m_t

    # Student: one streaming pass over the head.
    m_s, l_s = _student_stats(student_ptr, row * n_cols + begin, row * n_cols + end, exp_scale, BLOCK, ALIGN)
    base_s = _base(m_s)
    base_t = _base(m_t)

    # A and the +inf flag over the entries, relative to the final maxima.
    a = tl.full((), 0.0, tl.float32)
    inf = tl.full((), 0.0, tl.float32)
    for j0 in range(0, k, BLOCK_K):
        v, index, usable, bad, s = _load_entries(v_row, i_row, s_head, j0 + tl.arange(0, BLOCK_K), k, head_size)
        v_t = v - base_t
        e_t = tl.exp2(v_t * exp_scale)
        # No mass, no term (even against a student -inf); `e_t == 0` keeps NaN NaN.
        a += tl.sum(tl.where(e_t == 0.0, 0.0, e_t * ((v_t - (s - base_s)) * A_TERM_SCALE)), axis=0)
        inf = tl.maximum(inf, tl.max(tl.where(usable & (s == NEG_INF) & (v > NEG_INF), 1.0, 0.0), axis=0))
    loss = _head_loss(m_s, l_s, m_t, l_t, a, inf, tau, weight)
    loss = tl.where(num_bad > 0, float("nan"), loss)
    tl.store(head_loss_ptr + row * n_heads + head, loss.to(tl.float32))

    if COMPUTE_GRAD:
        # NaN for a NaN head, 0 for padding only or weight 0, else coef.
        coef = _grad_gate(loss, l_t, weight).to(tl.float32) * (grad_scale * weight * tau)
        log2_l_s = _log2_sum(l_s)  # a student with no mass: q = 0
        log2_l_t = _log2_sum(l_t)
        g_head = grad_ptr + row * n_cols + begin
        # coef * softmax(s / tau) over the head, a tile at a time.
        for c0 in range(0, head_size, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            in_head = cols < head_size
            u = tl.load(s_head + cols, mask=in_head, other=NEG_INF).to(tl.float32)
            g = coef * tl.exp2((u - base_s) * exp_scale - log2_l_s)
            tl.store(g_head + cols, g.to(g_head.dtype.element_ty), mask=in_head)
        # The entries' addresses were written by other threads of this program.
        tl.debug_barrier()
        for j0 in range(0, k, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            v, index, usable, bad, s = _load_entries(v_row, i_row, s_head, offs_j, k, head_size)
            # P[j] = sum of p over the entries with index[j] (itself included).
            mass = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for i0 in range(0, k, BLOCK_K):
                offs_i = i0 + tl.arange(0, BLOCK_K)
                in_k = offs_i < k
                v_i = tl.load(v_row + offs_i, mask=in_k, other=NEG_INF).to(tl.float32)
                index_i = tl.load(i_row + offs_i, mask=in_k, other=-1).to(tl.int64)
                p_i = tl.exp2((v_i - base_t) * exp_scale - log2_l_t)
                same = (index[:, None] == index_i[None, :]) & (v_i[None, :] != NEG_INF)
                mass += tl.sum(tl.where(same, p_i[None, :], 0.0), axis=1)
            q = tl.exp2((s - base_s) * exp_scale - log2_l_s)
            g = coef * (q - mass)
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
    grad_scale: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: ``(head_losses [B, H] float32, grad)``.

    ``head_losses[b, h] = w_h * tau_h**2 * KL_h(row b)``; ``grad`` is
    ``grad_scale * w_h * tau_h * (softmax_s - scatter(p))`` (``grad_scale`` is the
    reduction's) in the student's dtype, ``[B, N]``, or an empty ``[0]`` tensor
    without ``compute_grad``. Inputs as in :mod:`rcfast.ops.sparse_contract`
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
            # grad_scale as given (as the dense kernel): under torch.compile(dynamic=True) it is
            # 1/B of a symbolic B, and float() would specialise the graph on the batch size.
            temperatures, weights, head_losses, num_cols, num_heads, k, grad_scale,
            COMPUTE_GRAD=compute_grad, BLOCK=block, BLOCK_K=entry_block(k), ALIGN=ALIGN, num_warps=num_warps,
        )
    return head_losses, grad
