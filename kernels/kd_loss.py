"""Triton kernels of the fused multi-head softened-KL loss (DESIGN.md, "The kernel algorithm").

This module owns the ``@triton.jit`` kernels, their launch heuristic and the host
function :func:`kd_head_losses` that allocates buffers and launches them. The
``torch.library`` op wrapping it is :mod:`rcfast.ops.triton_backend`.

Layout: ``student`` and ``teacher`` are contiguous ``[B, N]`` packed logits; head
``h`` is columns ``head_offsets[h] .. head_offsets[h+1]-1``. The per-head table is
three small device tensors (int64 offsets, float32 temperatures and weights): a
program adds the integer offset to the row's base pointer, so any mix of head
widths runs in one launch and no tensor of pointers is ever built.

The math is csrc/kd_math.h's, written again in Triton: logits stay in their own
units (u / tau is never formed, so a large logit over a small temperature cannot
overflow), exps are ``2^((u - b) c)`` with ``c = log2(e) / tau`` and ``b`` a
running max, and per (row, head) the running statistics are

- ``m_s, m_t``: the running max of the student's and the teacher's logits;
- ``l_s, l_t``: ``sum 2^((u - b) c)`` relative to those maxima;
- ``A = sum e_t ((u_t - b_t) - (u_s - b_s)) * A_TERM_SCALE``, the teacher-weighted
  gap relative to the maxima (so it stays of the order of the KL), corrected
  exactly when a max moves (:func:`_rebase`);
- ``inf``: whether a student ``-inf`` met a finite teacher logit (the KL is +inf).

The loss of a head is ``w tau ((A / A_TERM_SCALE) / l_t + tau ln(l_s / l_t))``,
formed in float64 (:func:`_head_loss`).

Two paths, chosen on the host from shapes only (no device value is read):

- **fused** (the common case): one program per (row, head). Pass 1 streams the
  head's classes in ``BLOCK``-wide tiles updating the statistics; pass 2 (only
  with ``COMPUTE_GRAD``) streams them again and writes
  ``grad_scale * w * tau * (softmax_s - softmax_t)`` in the student's dtype.
- **split** (few rows, very wide heads: too few (row, head) programs to fill the
  GPU): the classes of each head are cut into ``num_splits`` chunks, one program
  per (row, head, chunk) writes its partial statistics; one program per (row,
  head) merges them (the same :func:`_rebase` algebra) into the loss and the
  softmax constants; a third kernel over (row, head, chunk) writes the gradient.

Every load is cast to float32 at once (fp16/bf16 in, fp32 math; the interpreter
cannot do bf16 arithmetic anyway). ``-inf``, ``+inf`` and NaN follow
:mod:`rcfast.ops.reference`. The per-(row, head) losses are written to a
``[B, H]`` buffer (no atomics), so the caller's reduction is deterministic.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

__all__ = [
    "LaunchConfig", "SplitPolicy", "DEFAULT_SPLIT_POLICY", "MIN_BLOCK", "MAX_BLOCK",
    "ALIGN", "block_and_warps", "launch_config", "launch_settings", "kd_head_losses", "NUM_PARTIAL_STATS",
]

# Tiles are powers of two between these. 4096 fp32 lanes over 8 warps is 16
# values per thread per input: wide enough for 16-byte vector loads of bf16 and
# enough bytes in flight, small enough to keep the tile and its temporaries in
# registers (heads wider than this loop over tiles, so the cap bounds registers,
# not head width).
MIN_BLOCK = 64
MAX_BLOCK = 4096

# Tile bodies start at multiples of this many elements so their loads and stores
# are 16-byte vectors (8 bf16/fp16 or 4 fp32 lanes; 16 covers both with margin).
ALIGN = 16

# Partial statistics per (row, head, chunk) in the split path: m_s, l_s, m_t, l_t, A, inf.
NUM_PARTIAL_STATS = 6
# What the gradient pass needs per (row, head): base_s, log2 l_s, base_t, log2 l_t, gate.
NUM_GRAD_STATS = 5

# Globals read by @triton.jit code must be tl.constexpr instances (not annotations).
NEG_INF = tl.constexpr(float("-inf"))
LOG2E = tl.constexpr(1.4426950408889634)
# A is accumulated times this (csrc/kd_math.h kATermScale): a gap can be twice
# the largest float, and A sums C of them.
A_TERM_SCALE = tl.constexpr(2.0 ** -32)


# --------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------

@triton.jit
def _chunk_bounds(head_offsets_ptr, head, chunk, NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """Columns ``[begin, end)`` of chunk ``chunk`` of head ``head``.

    Chunks are whole tiles; with ``NUM_SPLITS == 1`` the single chunk is the whole
    head. A head narrower than ``NUM_SPLITS`` tiles leaves its last chunks empty
    (``begin >= end``): those programs load nothing and report the identity of
    the merge.
    """
    head_begin = tl.load(head_offsets_ptr + head)
    head_end = tl.load(head_offsets_ptr + head + 1)
    tiles_per_chunk = tl.cdiv(tl.cdiv(head_end - head_begin, BLOCK), NUM_SPLITS)
    begin = head_begin + chunk * tiles_per_chunk * BLOCK
    end = tl.minimum(begin + tiles_per_chunk * BLOCK, head_end)
    return begin, end


@triton.jit
def _segments(lo, hi, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Cut ``[lo, hi)`` (absolute element indices) into prologue, body and tail.

    The body ``[body_lo, body_hi)`` is whole ``BLOCK`` tiles starting at a multiple
    of ``ALIGN`` elements, read without masks, so the compiler emits 16-byte vector
    loads (heads start anywhere in a row and rows start anywhere: N need not be a
    multiple of anything). The prologue (fewer than ``ALIGN`` elements before
    ``body_lo``) and the tail (fewer than ``BLOCK`` after ``body_hi``) are masked.
    """
    body_lo = tl.minimum(tl.cdiv(lo, ALIGN) * ALIGN, hi)
    body_hi = body_lo + ((hi - body_lo) // BLOCK) * BLOCK
    return body_lo, body_hi


@triton.jit
def _base(running_max):
    # The base exps are taken relative to: 0 while the max is still -inf (then every
    # exp is 2^-inf = 0, not 2^NaN).
    return tl.where(running_max == NEG_INF, 0.0, running_max)


@triton.jit
def _rebase(m_s, l_s, m_t, l_t, a, new_m_s, new_m_t, exp_scale):
    """Move ``(l_s, l_t, A)`` from maxima ``(m_s, m_t)`` to ``(new_m_s, new_m_t)`` >= them.

    Sums are rescaled by ``2^((m_old - b_new) c)`` (0 from a max of -inf); every
    bracket of ``A`` loses (moved teacher base) - (moved student base). Where the
    teacher had no mass yet ``A`` and ``l_t`` are 0; where its mass underflows the
    factor is 0: both leave ``A = 0`` (an ``inf * 0`` would be NaN; a NaN in ``A``
    always shows in a sum as well).
    """
    new_base_s = _base(new_m_s)
    new_base_t = _base(new_m_t)
    alpha_s = tl.exp2((m_s - new_base_s) * exp_scale)
    alpha_t = tl.exp2((m_t - new_base_t) * exp_scale)
    moved = (new_base_t - _base(m_t)) - (new_base_s - _base(m_s))
    a = tl.where(l_t == 0.0, a, a - moved * l_t * A_TERM_SCALE)
    a = tl.where(alpha_t == 0.0, 0.0, a * alpha_t)
    # A NaN sum stays NaN (a NaN logit may be dropped by the max, never by the sums).
    l_s = tl.where((alpha_s == 0.0) & (l_s == l_s), 0.0, l_s * alpha_s)
    l_t = tl.where((alpha_t == 0.0) & (l_t == l_t), 0.0, l_t * alpha_t)
    return l_s, l_t, a


@triton.jit
def _stats_tile(s_ptr, t_ptr, offs, lo, hi, exp_scale, m_s, l_s, m_t, l_t, a, inf, MASKED: tl.constexpr):
    """Fold one tile into the running statistics (module docstring).

    (Helpers are inlined by hand in the per-tile functions where it matters: the
    interpreter re-patches ``triton.language`` on every nested ``@triton.jit``
    call, ~4 ms each.)
    """
    # Cast to float32 at the load (fp16/bf16 in, fp32 math).
    if MASKED:
        # Lanes outside [lo, hi) read -inf: a masked class, which adds nothing anywhere.
        mask = (offs >= lo) & (offs < hi)
        u_s = tl.load(s_ptr + offs, mask=mask, other=NEG_INF).to(tl.float32)
        u_t = tl.load(t_ptr + offs, mask=mask, other=NEG_INF).to(tl.float32)
    else:
        u_s = tl.load(s_ptr + offs).to(tl.float32)
        u_t = tl.load(t_ptr + offs).to(tl.float32)
    new_m_s = tl.maximum(m_s, tl.max(u_s, axis=0))
    new_m_t = tl.maximum(m_t, tl.max(u_t, axis=0))
    l_s, l_t, a = _rebase(m_s, l_s, m_t, l_t, a, new_m_s, new_m_t, exp_scale)
    v_s = u_s - _base(new_m_s)
    v_t = u_t - _base(new_m_t)
    e_s = tl.exp2(v_s * exp_scale)
    e_t = tl.exp2(v_t * exp_scale)
    l_s += tl.sum(e_s, axis=0)
    l_t += tl.sum(e_t, axis=0)
    # Where the teacher has no mass the term is 0, even if the gap is inf or NaN
    # (-inf - -inf): guard the product rather than compute 0 * inf. Testing
    # `e_t == 0` (not `e_t > 0`) keeps a NaN teacher NaN.
    a += tl.sum(tl.where(e_t == 0.0, 0.0, e_t * ((v_t - v_s) * A_TERM_SCALE)), axis=0)
    student_inf = (u_s == NEG_INF) & (u_t > NEG_INF)
    inf = tl.maximum(inf, tl.max(tl.where(student_inf, 1.0, 0.0), axis=0))
    # A NaN logit may be dropped by the max but not by the sums (2^NaN = NaN), and
    # a +inf logit makes its own exp 2^(inf - inf) = NaN.
    return new_m_s, l_s, new_m_t, l_t, a, inf


@triton.jit
def _empty_stats():
    """The statistics of no class at all (the identity of the merge)."""
    m_s = tl.full((), NEG_INF, tl.float32)
    m_t = tl.full((), NEG_INF, tl.float32)
    zero = tl.full((), 0.0, tl.float32)
    return m_s, zero, m_t, zero, zero, zero


@triton.jit
def _online_stats(s_ptr, t_ptr, lo, hi, exp_scale, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Pass 1 over elements ``[lo, hi)``: ``(m_s, l_s, m_t, l_t, A, inf)``."""
    m_s, l_s, m_t, l_t, a, inf = _empty_stats()
    body_lo, body_hi = _segments(lo, hi, BLOCK, ALIGN)
    if lo < body_lo:
        offs = body_lo - ALIGN + tl.arange(0, ALIGN)
        m_s, l_s, m_t, l_t, a, inf = _stats_tile(s_ptr, t_ptr, offs, lo, hi, exp_scale,
                                                 m_s, l_s, m_t, l_t, a, inf, True)
    for start in range(body_lo, body_hi, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), ALIGN), BLOCK)
        m_s, l_s, m_t, l_t, a, inf = _stats_tile(s_ptr, t_ptr, offs, lo, hi, exp_scale,
                                                 m_s, l_s, m_t, l_t, a, inf, False)
    if body_hi < hi:
        offs = body_hi + tl.arange(0, BLOCK)
        m_s, l_s, m_t, l_t, a, inf = _stats_tile(s_ptr, t_ptr, offs, lo, hi, exp_scale,
                                                 m_s, l_s, m_t, l_t, a, inf, True)
    return m_s, l_s, m_t, l_t, a, inf


@triton.jit
def _head_loss(m_s, l_s, m_t, l_t, a, inf, tau, weight):
    """``w tau^2 KL(p_t || p_s)`` of one head from its final statistics, in float64.

    Degenerate heads as in the reference, by priority: NaN in (or a +inf logit)
    gives NaN; a teacher ``-inf`` on every class (``l_t == 0``) has no
    distribution, so 0; a head of weight 0 adds 0; a student ``-inf`` under a
    finite teacher logit gives ``w * inf``. Tests are ``== 0``, never ``> 0``, so
    that NaN sums stay NaN.
    """
    tau64 = tau.to(tl.float64)
    weight64 = weight.to(tl.float64)
    l_t64 = l_t.to(tl.float64)
    mean_gap = a.to(tl.float64) / A_TERM_SCALE / l_t64
    log_ratio = tl.log(l_s.to(tl.float64) / l_t64)
    loss = weight64 * tau64 * (mean_gap + tau64 * log_ratio)
    loss = tl.where(inf != 0.0, weight64 * float("inf"), loss)
    loss = tl.where((weight64 == 0.0) | (l_t == 0.0), 0.0, loss)
    has_nan = (l_s != l_s) | (l_t != l_t) | (a != a) | (m_s != m_s) | (m_t != m_t)
    return tl.where(has_nan, float("nan"), loss)


@triton.jit
def _log2_sum(l):
    # log2 of a final sum as pass 2 uses it: 0 for an empty head, whose exps are all 0.
    return tl.where(l == 0.0, 0.0, tl.log2(l))


@triton.jit
def _grad_gate(loss, l_t, weight):
    # Multiplies the gradient: NaN for a NaN head (NaN in, NaN out), 0 for a fully
    # masked teacher or a head of weight 0, else 1.
    gate = tl.where((l_t == 0.0) | (weight == 0.0), 0.0, 1.0)
    return tl.where(loss != loss, float("nan"), gate)


@triton.jit
def _grad_tile(s_ptr, t_ptr, g_ptr, offs, lo, hi, exp_scale, base_s, log2_l_s, base_t, log2_l_t, coef,
               MASKED: tl.constexpr):
    if MASKED:
        mask = (offs >= lo) & (offs < hi)
        u_s = tl.load(s_ptr + offs, mask=mask, other=NEG_INF).to(tl.float32)
        u_t = tl.load(t_ptr + offs, mask=mask, other=NEG_INF).to(tl.float32)
    else:
        u_s = tl.load(s_ptr + offs).to(tl.float32)
        u_t = tl.load(t_ptr + offs).to(tl.float32)
    # softmax = 2^((u - b) c - log2 l); a student -inf everywhere has l_s = 0 and all
    # its exps 0, so its softmax is taken as 0 (the gradient is -coef * p_t).
    p_s = tl.exp2((u_s - base_s) * exp_scale - log2_l_s)
    p_t = tl.exp2((u_t - base_t) * exp_scale - log2_l_t)
    g = (coef * (p_s - p_t)).to(g_ptr.dtype.element_ty)
    if MASKED:
        tl.store(g_ptr + offs, g, mask=mask)
    else:
        tl.store(g_ptr + offs, g)


@triton.jit
def _write_grad(s_ptr, t_ptr, g_ptr, lo, hi, exp_scale, base_s, log2_l_s, base_t, log2_l_t, coef,
                BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Pass 2 over elements ``[lo, hi)``: ``coef * (softmax_s - softmax_t)``."""
    body_lo, body_hi = _segments(lo, hi, BLOCK, ALIGN)
    if lo < body_lo:
        offs = body_lo - ALIGN + tl.arange(0, ALIGN)
        _grad_tile(s_ptr, t_ptr, g_ptr, offs, lo, hi, exp_scale, base_s, log2_l_s, base_t, log2_l_t, coef, True)
    for start in range(body_lo, body_hi, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), ALIGN), BLOCK)
        _grad_tile(s_ptr, t_ptr, g_ptr, offs, lo, hi, exp_scale, base_s, log2_l_s, base_t, log2_l_t, coef, False)
    if body_hi < hi:
        offs = body_hi + tl.arange(0, BLOCK)
        _grad_tile(s_ptr, t_ptr, g_ptr, offs, lo, hi, exp_scale, base_s, log2_l_s, base_t, log2_l_t, coef, True)


@triton.jit
def _kd_fused_kernel(
    student_ptr, teacher_ptr, grad_ptr, head_offsets_ptr, temperatures_ptr, weights_ptr,
    head_loss_ptr, n_cols, n_heads, grad_scale,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program per (row, head): loss to ``head_loss[row, head]``, gradient to ``grad[row, head's columns]``."""
    # Rows on grid axis 0 (up to 2**31 - 1 programs), heads on axis 1 (up to 65535).
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    begin, end = _chunk_bounds(head_offsets_ptr, head, 0, 1, BLOCK)
    tau = tl.load(temperatures_ptr + head)
    weight = tl.load(weights_ptr + head)
    exp_scale = LOG2E / tau
    # Absolute int64 element indices into the flat [B * N] tensors: B * N can exceed
    # 2**31 (e.g. 8192 rows of 512k classes), and alignment is decided on them.
    lo = row * n_cols + begin
    hi = row * n_cols + end
    m_s, l_s, m_t, l_t, a, inf = _online_stats(student_ptr, teacher_ptr, lo, hi, exp_scale, BLOCK, ALIGN)
    loss = _head_loss(m_s, l_s, m_t, l_t, a, inf, tau, weight)
    tl.store(head_loss_ptr + row * n_heads + head, loss.to(tl.float32))
    if COMPUTE_GRAD:
        coef = _grad_gate(loss, l_t, weight).to(tl.float32) * (grad_scale * weight * tau)
        _write_grad(student_ptr, teacher_ptr, grad_ptr, lo, hi, exp_scale, _base(m_s), _log2_sum(l_s),
                    _base(m_t), _log2_sum(l_t), coef, BLOCK, ALIGN)


@triton.jit
def _kd_partial_stats_kernel(
    student_ptr, teacher_ptr, head_offsets_ptr, temperatures_ptr, partial_ptr, n_cols, n_heads,
    NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    """Split path, pass 1: one program per (row, head, chunk) writes ``partial[row, head, chunk, :]``."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    chunk = tl.program_id(2)
    begin, end = _chunk_bounds(head_offsets_ptr, head, chunk, NUM_SPLITS, BLOCK)
    exp_scale = LOG2E / tl.load(temperatures_ptr + head)
    m_s, l_s, m_t, l_t, a, inf = _online_stats(
        student_ptr, teacher_ptr, row * n_cols + begin, row * n_cols + end, exp_scale, BLOCK, ALIGN)
    out = partial_ptr + ((row * n_heads + head) * NUM_SPLITS + chunk) * 6
    tl.store(out + 0, m_s)
    tl.store(out + 1, l_s)
    tl.store(out + 2, m_t)
    tl.store(out + 3, l_t)
    tl.store(out + 4, a)
    tl.store(out + 5, inf)


@triton.jit
def _kd_merge_kernel(
    partial_ptr, temperatures_ptr, weights_ptr, head_loss_ptr, grad_stats_ptr, n_heads,
    NUM_SPLITS: tl.constexpr,
):
    """Split path, merge: one program per (row, head) merges its chunks' statistics
    (the :func:`_rebase` algebra, chunk by chunk) into the head's loss and what the
    gradient pass needs (``grad_stats[row, head, :5]``)."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    tau = tl.load(temperatures_ptr + head)
    weight = tl.load(weights_ptr + head)
    exp_scale = LOG2E / tau
    m_s, l_s, m_t, l_t, a, inf = _empty_stats()
    has_nan = tl.full((), 0.0, tl.float32)
    base = partial_ptr + (row * n_heads + head) * NUM_SPLITS * 6
    for chunk in range(NUM_SPLITS):
        stats = base + chunk * 6
        c_m_s = tl.load(stats + 0)
        c_l_s = tl.load(stats + 1)
        c_m_t = tl.load(stats + 2)
        c_l_t = tl.load(stats + 3)
        c_a = tl.load(stats + 4)
        # A NaN max (a NaN logit) must survive the merge: tl.maximum may drop it.
        has_nan = tl.maximum(has_nan, tl.where((c_m_s != c_m_s) | (c_m_t != c_m_t), 1.0, 0.0))
        new_m_s = tl.maximum(m_s, c_m_s)
        new_m_t = tl.maximum(m_t, c_m_t)
        l_s, l_t, a = _rebase(m_s, l_s, m_t, l_t, a, new_m_s, new_m_t, exp_scale)
        c_l_s, c_l_t, c_a = _rebase(c_m_s, c_l_s, c_m_t, c_l_t, c_a, new_m_s, new_m_t, exp_scale)
        l_s += c_l_s
        l_t += c_l_t
        a += c_a
        inf = tl.maximum(inf, tl.load(stats + 5))
        m_s = new_m_s
        m_t = new_m_t
    m_s = tl.where(has_nan != 0.0, float("nan"), m_s)
    loss = _head_loss(m_s, l_s, m_t, l_t, a, inf, tau, weight)
    tl.store(head_loss_ptr + row * n_heads + head, loss.to(tl.float32))
    out = grad_stats_ptr + (row * n_heads + head) * 5
    tl.store(out + 0, _base(m_s))
    tl.store(out + 1, _log2_sum(l_s))
    tl.store(out + 2, _base(m_t))
    tl.store(out + 3, _log2_sum(l_t))
    tl.store(out + 4, _grad_gate(loss, l_t, weight).to(tl.float32))


@triton.jit
def _kd_split_grad_kernel(
    student_ptr, teacher_ptr, grad_ptr, head_offsets_ptr, temperatures_ptr, weights_ptr,
    grad_stats_ptr, n_cols, n_heads, grad_scale,
    NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    """Split path, pass 2: one program per (row, head, chunk) writes its chunk's gradient."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    chunk = tl.program_id(2)
    begin, end = _chunk_bounds(head_offsets_ptr, head, chunk, NUM_SPLITS, BLOCK)
    tau = tl.load(temperatures_ptr + head)
    weight = tl.load(weights_ptr + head)
    stats = grad_stats_ptr + (row * n_heads + head) * 5
    coef = tl.load(stats + 4) * (grad_scale * weight * tau)
    _write_grad(student_ptr, teacher_ptr, grad_ptr, row * n_cols + begin, row * n_cols + end, LOG2E / tau,
                tl.load(stats + 0), tl.load(stats + 1), tl.load(stats + 2), tl.load(stats + 3),
                coef, BLOCK, ALIGN)


# --------------------------------------------------------------------------------------
# Launch heuristics (host, shapes only)
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How one call is launched: tile width, warps per program, chunks per head."""

    block: int
    num_warps: int
    num_splits: int


@dataclasses.dataclass(frozen=True)
class SplitPolicy:
    """When a head's classes are split across several programs.

    Splitting pays only when (row, head) programs are too few to fill the GPU
    (``target_programs``, default ``programs_per_sm`` per SM) and the head is
    wide enough that each chunk still streams ``min_cols_per_split`` classes.
    In the interpreter (CPU tensors) the default target is 1 program: it runs
    programs one at a time, so splitting would only add work. Pass another
    policy to :func:`launch_config` (tests force the split path that way).
    """

    min_cols_per_split: int = 16384
    max_splits: int = 64
    programs_per_sm: int = 4
    target_programs: int | None = None


DEFAULT_SPLIT_POLICY = SplitPolicy()

# What launch_config uses when a caller passes nothing: (split policy, tile cap).
# Set only through launch_settings (a context, so nothing leaks out of it).
_LAUNCH_SETTINGS: contextvars.ContextVar[tuple[SplitPolicy, int]] = contextvars.ContextVar(
    "rcfast_kd_launch_settings", default=(DEFAULT_SPLIT_POLICY, MAX_BLOCK))


@contextlib.contextmanager
def launch_settings(policy: SplitPolicy | None = None, max_block: int | None = None):
    """Within the block, calls that do not pass a launch config (e.g. through
    ``rcfast.multihead_kd_loss``) use this split policy and tile cap: for tests
    (small tiles, a forced split path) and for tuning on an unusual GPU."""
    current_policy, current_block = _LAUNCH_SETTINGS.get()
    token = _LAUNCH_SETTINGS.set((policy or current_policy, max_block or current_block))
    try:
        yield
    finally:
        _LAUNCH_SETTINGS.reset(token)


def block_and_warps(max_head_width: int, max_block: int = MAX_BLOCK) -> tuple[int, int]:
    """Tile width and warps for heads up to ``max_head_width`` classes (Liger-style).

    The tile is the next power of two of the width, clamped to
    ``[MIN_BLOCK, max_block]`` (wider heads loop over tiles); warps grow with the
    tile so each thread keeps about 8-16 values per input.
    """
    block = min(max(triton.next_power_of_2(max(int(max_head_width), 1)), MIN_BLOCK), max_block)
    num_warps = min(max(block // 512, 1), 8)
    return block, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device, policy: SplitPolicy) -> int:
    if policy.target_programs is not None:
        return policy.target_programs
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return policy.programs_per_sm * _sm_count(index)
    return 1


def launch_config(num_rows: int, num_cols: int, num_heads: int, device: torch.device,
                  policy: SplitPolicy | None = None, max_block: int | None = None) -> LaunchConfig:
    """The launch of one call, from shapes only (no device value is read, so no sync).

    The widest head is not known without reading ``head_offsets``; every head has
    at least one class, so ``N - (H - 1)`` bounds it (exact for one head).
    ``policy``/``max_block`` default to :func:`launch_settings`' (normally
    :data:`DEFAULT_SPLIT_POLICY` and :data:`MAX_BLOCK`).
    """
    default_policy, default_block = _LAUNCH_SETTINGS.get()
    policy = policy or default_policy
    max_block = max_block or default_block
    num_rows, num_cols, num_heads = int(num_rows), int(num_cols), int(num_heads)
    widest = num_cols - (num_heads - 1)
    block, num_warps = block_and_warps(widest, max_block)
    num_splits = 1
    programs = num_rows * num_heads
    target = _target_programs(device, policy)
    if programs < target:
        num_splits = min(triton.cdiv(target, programs), widest // policy.min_cols_per_split,
                         policy.max_splits)
        num_splits = max(num_splits, 1)
    return LaunchConfig(block=block, num_warps=num_warps, num_splits=num_splits)


def _launch_context(device: torch.device):
    if device.type == "cuda":
        # Triton launches on the current CUDA device: make it the tensors' one.
        return torch.cuda.device(device)
    # CPU tensors run in the interpreter, i.e. NumPy, which warns on the -inf - -inf
    # and 0/0 the kernels compute on purpose and then discard with tl.where (the
    # same IEEE values a GPU computes silently).
    import numpy

    return numpy.errstate(invalid="ignore", divide="ignore", over="ignore")


# --------------------------------------------------------------------------------------
# Host function
# --------------------------------------------------------------------------------------

def kd_head_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    head_offsets: torch.Tensor,
    temperatures: torch.Tensor,
    weights: torch.Tensor,
    grad_scale: float,
    compute_grad: bool,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernels: ``(head_losses [B, H] float32, grad)``.

    ``head_losses[b, h] = w_h * tau_h**2 * KL_h(row b)``; ``grad`` is
    ``grad_scale * w_h * tau_h * (softmax_s - softmax_t)`` (``grad_scale`` is the
    reduction's, see ``rcfast.ops.kernel_contract.reduction_scale``) in the
    student's dtype, ``[B, N]``, or an empty ``[0]`` tensor without
    ``compute_grad``. Inputs are as in :mod:`rcfast.ops.kernel_contract`
    (contiguous, on one device). ``config`` overrides :func:`launch_config`.
    """
    num_rows, num_cols = student.shape
    num_heads = head_offsets.shape[0] - 1
    device = student.device
    if config is None:
        config = launch_config(num_rows, num_cols, num_heads, device)
    block, num_warps, num_splits = config.block, config.num_warps, config.num_splits
    # grad_scale stays as given: under torch.compile(dynamic=True) it is 1/B of a
    # symbolic B, and float() would specialise the graph on the batch size.

    head_losses = torch.empty((num_rows, num_heads), dtype=torch.float32, device=device)
    grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    # Without a gradient pass the pointer is never read; any tensor will do.
    grad_arg = grad if compute_grad else student

    with _launch_context(device):
        if num_splits == 1:
            wrap_triton(_kd_fused_kernel)[(num_rows, num_heads)](
                student, teacher, grad_arg, head_offsets, temperatures, weights,
                head_losses, num_cols, num_heads, grad_scale,
                COMPUTE_GRAD=compute_grad, BLOCK=block, ALIGN=ALIGN, num_warps=num_warps,
            )
            return head_losses, grad

        partial = torch.empty((num_rows, num_heads, num_splits, NUM_PARTIAL_STATS),
                              dtype=torch.float32, device=device)
        grad_stats = torch.empty((num_rows, num_heads, NUM_GRAD_STATS), dtype=torch.float32, device=device)
        wrap_triton(_kd_partial_stats_kernel)[(num_rows, num_heads, num_splits)](
            student, teacher, head_offsets, temperatures, partial, num_cols, num_heads,
            NUM_SPLITS=num_splits, BLOCK=block, ALIGN=ALIGN, num_warps=num_warps,
        )
        wrap_triton(_kd_merge_kernel)[(num_rows, num_heads)](
            partial, temperatures, weights, head_losses, grad_stats, num_heads,
            NUM_SPLITS=num_splits, num_warps=1,
        )
        if compute_grad:
            wrap_triton(_kd_split_grad_kernel)[(num_rows, num_heads, num_splits)](
                student, teacher, grad, head_offsets, temperatures, weights, grad_stats,
                num_cols, num_heads, grad_scale,
                NUM_SPLITS=num_splits, BLOCK=block, ALIGN=ALIGN, num_warps=num_warps,
            )
    return head_losses, grad
