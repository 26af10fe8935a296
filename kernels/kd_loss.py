"""Triton kernels of the fused multi-head softened-KL loss (DESIGN.md, "The kernel algorithm").

This module owns the ``@triton.jit`` kernels, their launch heuristic and the host
function :func:`kd_head_losses` that allocates buffers and launches them. The
``torch.library`` op wrapping it is :mod:`rcfast.ops.triton_backend`.

Layout: ``student`` and ``teacher`` are contiguous ``[B, N]`` packed logits; head
``h`` is columns ``head_offsets[h] .. head_offsets[h+1]-1``. The per-head table is
three small device tensors (int64 offsets, float32 temperatures and weights): a
program adds the integer offset to the row's base pointer, so any mix of head
widths runs in one launch and no tensor of pointers is ever built.

Two paths, chosen on the host from shapes only (no device value is read):

- **fused** (the common case): one program per (row, head). Pass 1 streams the
  head's classes in ``BLOCK``-wide tiles keeping, for ``x = logits / tau``, the
  running max ``m`` and ``l = sum exp(x - m)`` of student and teacher and
  ``A = sum exp(x_t - m_t) * (x_t - x_s)``, each rescaled by ``exp(m_old - m_new)``
  when the max moves. Then ``KL = A / l_t - lse_t + lse_s``. Pass 2 (only with
  ``COMPUTE_GRAD``) streams the classes again and writes
  ``scale * w * tau * (softmax(x_s) - softmax(x_t))`` in the student's dtype.
- **split** (few rows, very wide heads: too few (row, head) programs to fill the
  GPU): the classes of each head are cut into ``num_splits`` chunks, one program
  per (row, head, chunk) writes its partial ``(m_s, l_s, m_t, l_t, A)``; torch ops
  merge the partials (``O(B*H*splits)`` floats) into the loss and the two lse's,
  and a second kernel over (row, head, chunk) writes the gradient from them.

Every load is cast to float32 at once (fp16/bf16 in, fp32 math; the interpreter
cannot do bf16 arithmetic anyway). ``-inf`` follows :mod:`rcfast.ops.reference`:
a teacher ``-inf`` has p = 0 and adds nothing, even where the student is ``-inf``
too; a student ``-inf`` under teacher mass gives ``+inf``; NaN in gives NaN out.
The per-(row, head) losses are written to a ``[B, H]`` buffer (no atomics), so
the caller's reduction is deterministic.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

__all__ = [
    "REDUCTION_NONE", "REDUCTION_SUM", "REDUCTION_MEAN", "REDUCTION_BATCHMEAN",
    "LaunchConfig", "SplitPolicy", "SPLIT_POLICY", "MIN_BLOCK", "MAX_BLOCK",
    "ALIGN", "block_and_warps", "launch_config", "kd_head_losses", "NUM_PARTIAL_STATS",
]

# The reduction codes of rcfast.ops.kernel_contract.REDUCTION_CODES (this package
# must not import rcfast.ops; rcfast.ops.triton_backend checks they agree).
REDUCTION_NONE = 0
REDUCTION_SUM = 1
REDUCTION_MEAN = 2
REDUCTION_BATCHMEAN = 3

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

# Partial statistics per (row, head, chunk) in the split path: m_s, l_s, m_t, l_t, A.
NUM_PARTIAL_STATS = 5

# A global read by @triton.jit code must be a tl.constexpr instance (not an annotation).
NEG_INF = tl.constexpr(float("-inf"))


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
def _shift(running_max):
    # The shift used for a running max (see _stats_tile): 0 while it is still -inf.
    return tl.where(running_max == NEG_INF, 0.0, running_max)


@triton.jit
def _stats_tile(s_ptr, t_ptr, offs, lo, hi, tau, m_s, l_s, m_t, l_t, a, MASKED: tl.constexpr):
    """Fold one tile into the running ``(m_s, l_s, m_t, l_t, A)`` (see module doc).

    (Helpers are inlined by hand in the per-tile functions: the interpreter re-patches
    ``triton.language`` on every nested ``@triton.jit`` call, ~4 ms each.)
    """
    # Cast to float32 at the load (fp16/bf16 in, fp32 math). Divide, not multiply by
    # 1/tau, so x is bit-identical to the reference's logits / tau: at |x| ~ 1e3 one
    # ulp of x is already 6e-5 relative in exp(x).
    if MASKED:
        # Lanes outside [lo, hi) read -inf: a masked class, which adds nothing anywhere.
        mask = (offs >= lo) & (offs < hi)
        x_s = tl.load(s_ptr + offs, mask=mask, other=NEG_INF).to(tl.float32) / tau
        x_t = tl.load(t_ptr + offs, mask=mask, other=NEG_INF).to(tl.float32) / tau
    else:
        x_s = tl.load(s_ptr + offs).to(tl.float32) / tau
        x_t = tl.load(t_ptr + offs).to(tl.float32) / tau
    new_m_s = tl.maximum(m_s, tl.max(x_s, axis=0))
    new_m_t = tl.maximum(m_t, tl.max(x_t, axis=0))
    # exp(x - m) with m = -inf (nothing finite seen yet) would be exp(-inf + inf) =
    # NaN; shifting by 0 instead makes every such term exp(-inf) = 0, which is right
    # since then every x is -inf too.
    shift_s = tl.where(new_m_s == NEG_INF, 0.0, new_m_s)
    shift_t = tl.where(new_m_t == NEG_INF, 0.0, new_m_t)
    alpha_s = tl.exp(m_s - shift_s)
    alpha_t = tl.exp(m_t - shift_t)
    e_s = tl.exp(x_s - shift_s)
    e_t = tl.exp(x_t - shift_t)
    l_s = l_s * alpha_s + tl.sum(e_s, axis=0)
    l_t = l_t * alpha_t + tl.sum(e_t, axis=0)
    # Where the teacher has no mass the term is 0, even if x_t - x_s is -inf - -inf
    # (NaN) or -inf: guard the product rather than compute 0 * inf. Testing
    # `e_t == 0` (not `e_t > 0`) keeps a NaN teacher NaN.
    term = tl.where(e_t == 0.0, 0.0, e_t * (x_t - x_s))
    # Old terms whose weight underflows to 0 are dropped the same way (A may be
    # +inf from a student -inf); a NaN in A always shows in l_s or l_t as well.
    a = tl.where(alpha_t == 0.0, 0.0, a * alpha_t) + tl.sum(term, axis=0)
    return new_m_s, l_s, new_m_t, l_t, a


@triton.jit
def _online_stats(s_ptr, t_ptr, lo, hi, tau, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Pass 1 over elements ``[lo, hi)``: ``(m_s, l_s, m_t, l_t, A)`` (see module doc)."""
    m_s = tl.full((), NEG_INF, tl.float32)
    m_t = tl.full((), NEG_INF, tl.float32)
    l_s = tl.full((), 0.0, tl.float32)
    l_t = tl.full((), 0.0, tl.float32)
    a = tl.full((), 0.0, tl.float32)
    body_lo, body_hi = _segments(lo, hi, BLOCK, ALIGN)
    if lo < body_lo:
        offs = body_lo - ALIGN + tl.arange(0, ALIGN)
        m_s, l_s, m_t, l_t, a = _stats_tile(s_ptr, t_ptr, offs, lo, hi, tau,
                                            m_s, l_s, m_t, l_t, a, True)
    for start in range(body_lo, body_hi, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), ALIGN), BLOCK)
        m_s, l_s, m_t, l_t, a = _stats_tile(s_ptr, t_ptr, offs, lo, hi, tau,
                                            m_s, l_s, m_t, l_t, a, False)
    if body_hi < hi:
        offs = body_hi + tl.arange(0, BLOCK)
        m_s, l_s, m_t, l_t, a = _stats_tile(s_ptr, t_ptr, offs, lo, hi, tau,
                                            m_s, l_s, m_t, l_t, a, True)
    return m_s, l_s, m_t, l_t, a


@triton.jit
def _kl_from_stats(m_s, l_s, m_t, l_t, a):
    """``KL(p_t || p_s)`` of one head from its merged statistics.

    ``A / l_t = E_p[x_t - x_s]`` and ``lse = shift + log(l)``; the two shifts are
    subtracted first so that large logits do not cancel in float32. Degenerate
    heads as in the reference: a student ``-inf`` on every class (``l_s == 0``)
    gives ``+inf`` (the formula would be ``inf - inf``); a teacher ``-inf`` on every
    class (``l_t == 0``) has no distribution, so the head adds 0, which wins
    (unless the student has a NaN: NaN in, NaN out).
    Tests are ``== 0``, never ``> 0``, so that NaN sums stay NaN.
    """
    kl = a / l_t - (_shift(m_t) - _shift(m_s)) - tl.log(l_t) + tl.log(l_s)
    kl = tl.where(l_s == 0.0, float("inf"), kl)
    # A NaN student logit shows as a NaN l_s: it stays NaN even in a masked head.
    return tl.where(l_t == 0.0, tl.where(l_s != l_s, l_s, 0.0), kl)


@triton.jit
def _grad_scale(n_rows, n_heads, REDUCTION: tl.constexpr):
    # d(reduced loss)/d(row loss): 1/B for batchmean, 1/(B*H) for mean, 1 otherwise.
    # `* 1.0` rather than `.to(tl.float32)`: Triton passes an int argument equal to 1
    # as a constexpr, which has no `.to`.
    if REDUCTION == 3:
        scale = 1.0 / (n_rows * 1.0)
    elif REDUCTION == 2:
        scale = 1.0 / ((n_rows * 1.0) * (n_heads * 1.0))
    else:
        scale = 1.0
    return scale


@triton.jit
def _grad_tile(s_ptr, t_ptr, g_ptr, offs, lo, hi, tau, shift_s, log_l_s, shift_t, log_l_t, coef,
               no_teacher_mass, MASKED: tl.constexpr):
    if MASKED:
        mask = (offs >= lo) & (offs < hi)
        x_s = tl.load(s_ptr + offs, mask=mask, other=NEG_INF).to(tl.float32) / tau
        x_t = tl.load(t_ptr + offs, mask=mask, other=NEG_INF).to(tl.float32) / tau
    else:
        x_s = tl.load(s_ptr + offs).to(tl.float32) / tau
        x_t = tl.load(t_ptr + offs).to(tl.float32) / tau
    # softmax(x) = exp((x - shift) - log(l)), in that order like torch's log_softmax:
    # folding shift + log(l) into one lse first would round it to the ulp of shift,
    # a visible error in exp for large logits.
    p_s = tl.exp((x_s - shift_s) - log_l_s)
    p_t = tl.exp((x_t - shift_t) - log_l_t)
    g = tl.where(no_teacher_mass, 0.0, coef * (p_s - p_t)).to(g_ptr.dtype.element_ty)
    if MASKED:
        tl.store(g_ptr + offs, g, mask=mask)
    else:
        tl.store(g_ptr + offs, g)


@triton.jit
def _write_grad(s_ptr, t_ptr, g_ptr, lo, hi, tau, shift_s, log_l_s, shift_t, log_l_t, coef,
                BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Pass 2 over elements ``[lo, hi)``: ``coef * (softmax(x_s) - softmax(x_t))``."""
    # A head whose teacher is -inf everywhere (l_t = 0) adds nothing to the loss,
    # so it adds nothing to the gradient either.
    no_teacher_mass = log_l_t == NEG_INF
    log_l_t = tl.where(no_teacher_mass, 0.0, log_l_t)
    # A student -inf everywhere (l_s = 0) has p_s = 0 (not exp(-inf + inf)): the
    # gradient is then -coef * p_t, as the contract says for that row.
    log_l_s = tl.where(log_l_s == NEG_INF, 0.0, log_l_s)
    body_lo, body_hi = _segments(lo, hi, BLOCK, ALIGN)
    if lo < body_lo:
        offs = body_lo - ALIGN + tl.arange(0, ALIGN)
        _grad_tile(s_ptr, t_ptr, g_ptr, offs, lo, hi, tau, shift_s, log_l_s, shift_t, log_l_t,
                   coef, no_teacher_mass, True)
    for start in range(body_lo, body_hi, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), ALIGN), BLOCK)
        _grad_tile(s_ptr, t_ptr, g_ptr, offs, lo, hi, tau, shift_s, log_l_s, shift_t, log_l_t,
                   coef, no_teacher_mass, False)
    if body_hi < hi:
        offs = body_hi + tl.arange(0, BLOCK)
        _grad_tile(s_ptr, t_ptr, g_ptr, offs, lo, hi, tau, shift_s, log_l_s, shift_t, log_l_t,
                   coef, no_teacher_mass, True)


@triton.jit
def _kd_fused_kernel(
    student_ptr, teacher_ptr, grad_ptr, head_offsets_ptr, temperatures_ptr, weights_ptr,
    head_loss_ptr, n_cols, n_rows, n_heads,
    REDUCTION: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program per (row, head): loss to ``head_loss[row, head]``, gradient to ``grad[row, head's columns]``."""
    # Rows on grid axis 0 (up to 2**31 - 1 programs), heads on axis 1 (up to 65535).
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    begin, end = _chunk_bounds(head_offsets_ptr, head, 0, 1, BLOCK)
    tau = tl.load(temperatures_ptr + head)
    weight = tl.load(weights_ptr + head)
    # Absolute int64 element indices into the flat [B * N] tensors: B * N can exceed
    # 2**31 (e.g. 8192 rows of 512k classes), and alignment is decided on them.
    lo = row * n_cols + begin
    hi = row * n_cols + end
    m_s, l_s, m_t, l_t, a = _online_stats(student_ptr, teacher_ptr, lo, hi, tau, BLOCK, ALIGN)
    kl = _kl_from_stats(m_s, l_s, m_t, l_t, a)
    tl.store(head_loss_ptr + row * n_heads + head, weight * tau * tau * kl)
    if COMPUTE_GRAD:
        coef = _grad_scale(n_rows, n_heads, REDUCTION) * weight * tau
        _write_grad(student_ptr, teacher_ptr, grad_ptr, lo, hi, tau,
                    _shift(m_s), tl.log(l_s), _shift(m_t), tl.log(l_t), coef, BLOCK, ALIGN)


@triton.jit
def _kd_partial_stats_kernel(
    student_ptr, teacher_ptr, head_offsets_ptr, temperatures_ptr, partial_ptr, n_cols, n_heads,
    NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    """Split path, pass 1: one program per (row, head, chunk) writes ``partial[row, head, chunk, :5]``."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    chunk = tl.program_id(2)
    begin, end = _chunk_bounds(head_offsets_ptr, head, chunk, NUM_SPLITS, BLOCK)
    tau = tl.load(temperatures_ptr + head)
    m_s, l_s, m_t, l_t, a = _online_stats(
        student_ptr, teacher_ptr, row * n_cols + begin, row * n_cols + end, tau, BLOCK, ALIGN)
    out = partial_ptr + ((row * n_heads + head) * NUM_SPLITS + chunk) * 5
    tl.store(out + 0, m_s)
    tl.store(out + 1, l_s)
    tl.store(out + 2, m_t)
    tl.store(out + 3, l_t)
    tl.store(out + 4, a)


@triton.jit
def _kd_split_grad_kernel(
    student_ptr, teacher_ptr, grad_ptr, head_offsets_ptr, temperatures_ptr, weights_ptr,
    row_stats_ptr, n_cols, n_rows, n_heads,
    REDUCTION: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    """Split path, pass 2: one program per (row, head, chunk) writes its chunk's gradient."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    chunk = tl.program_id(2)
    begin, end = _chunk_bounds(head_offsets_ptr, head, chunk, NUM_SPLITS, BLOCK)
    tau = tl.load(temperatures_ptr + head)
    weight = tl.load(weights_ptr + head)
    # The merged (shift_s, log l_s, shift_t, log l_t) of this row and head.
    stats = row_stats_ptr + (row * n_heads + head) * 4
    coef = _grad_scale(n_rows, n_heads, REDUCTION) * weight * tau
    _write_grad(student_ptr, teacher_ptr, grad_ptr, row * n_cols + begin, row * n_cols + end, tau,
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
    programs one at a time, so splitting would only add work; tests force the
    split path by replacing :data:`SPLIT_POLICY`.
    """

    min_cols_per_split: int = 16384
    max_splits: int = 64
    programs_per_sm: int = 4
    target_programs: int | None = None


# Module-level so that tests (and users with unusual GPUs) can replace it.
SPLIT_POLICY = SplitPolicy()


def block_and_warps(max_head_width: int) -> tuple[int, int]:
    """Tile width and warps for heads up to ``max_head_width`` classes (Liger-style).

    The tile is the next power of two of the width, clamped to
    ``[MIN_BLOCK, MAX_BLOCK]`` (wider heads loop over tiles); warps grow with the
    tile so each thread keeps about 8-16 values per input.
    """
    block = min(max(triton.next_power_of_2(max(int(max_head_width), 1)), MIN_BLOCK), MAX_BLOCK)
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
                  policy: SplitPolicy | None = None) -> LaunchConfig:
    """The launch of one call, from shapes only (no device value is read, so no sync).

    The widest head is not known without reading ``head_offsets``; every head has
    at least one class, so ``N - (H - 1)`` bounds it (exact for one head).
    """
    policy = SPLIT_POLICY if policy is None else policy
    num_rows, num_cols, num_heads = int(num_rows), int(num_cols), int(num_heads)
    widest = num_cols - (num_heads - 1)
    block, num_warps = block_and_warps(widest)
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

def _merge_partials(partial: torch.Tensor):
    """Merge ``[B, H, S, 5]`` partial statistics over the chunks (torch ops, no sync).

    Same algebra as the in-kernel rescaling: each chunk's sums are brought to the
    merged max by ``exp(m_chunk - shift)``; an empty or all ``-inf`` chunk has
    ``m = -inf``, weight 0 and sums 0.
    """
    m_s, l_s, m_t, l_t, a = partial.unbind(-1)
    max_s = m_s.amax(dim=-1)
    max_t = m_t.amax(dim=-1)
    neg_inf = torch.tensor(float("-inf"), dtype=partial.dtype, device=partial.device)
    zero = torch.zeros((), dtype=partial.dtype, device=partial.device)
    shift_s = torch.where(max_s == neg_inf, zero, max_s)
    shift_t = torch.where(max_t == neg_inf, zero, max_t)
    weight_s = torch.exp(m_s - shift_s.unsqueeze(-1))
    weight_t = torch.exp(m_t - shift_t.unsqueeze(-1))
    sum_s = (l_s * weight_s).sum(dim=-1)
    sum_t = (l_t * weight_t).sum(dim=-1)
    # As in the kernel: a chunk whose weight underflows to 0 drops its A (possibly +inf).
    sum_a = torch.where(weight_t == 0, zero, a * weight_t).sum(dim=-1)
    kl = sum_a / sum_t - (shift_t - shift_s) - torch.log(sum_t) + torch.log(sum_s)
    kl = torch.where(sum_s == 0, torch.full_like(kl, float("inf")), kl)
    kl = torch.where(sum_t == 0, torch.where(torch.isnan(sum_s), sum_s, zero), kl)
    row_stats = torch.stack([shift_s, torch.log(sum_s), shift_t, torch.log(sum_t)], dim=-1)
    return kl, row_stats.contiguous()


def kd_head_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    head_offsets: torch.Tensor,
    temperatures: torch.Tensor,
    weights: torch.Tensor,
    reduction: int,
    compute_grad: bool,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernels: ``(head_losses [B, H] float32, grad)``.

    ``head_losses[b, h] = w_h * tau_h**2 * KL_h(row b)``; ``grad`` is the
    gradient of the reduced loss (``reduction`` selects its scale) in the
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

    head_losses = torch.empty((num_rows, num_heads), dtype=torch.float32, device=device)
    grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    # Without a gradient pass the pointer is never read; any tensor will do.
    grad_arg = grad if compute_grad else student

    with _launch_context(device):
        if num_splits == 1:
            wrap_triton(_kd_fused_kernel)[(num_rows, num_heads)](
                student, teacher, grad_arg, head_offsets, temperatures, weights,
                head_losses, num_cols, num_rows, num_heads,
                REDUCTION=reduction, COMPUTE_GRAD=compute_grad, BLOCK=block, ALIGN=ALIGN,
                num_warps=num_warps,
            )
            return head_losses, grad

        partial = torch.empty((num_rows, num_heads, num_splits, NUM_PARTIAL_STATS),
                              dtype=torch.float32, device=device)
        wrap_triton(_kd_partial_stats_kernel)[(num_rows, num_heads, num_splits)](
            student, teacher, head_offsets, temperatures, partial, num_cols, num_heads,
            NUM_SPLITS=num_splits, BLOCK=block, ALIGN=ALIGN, num_warps=num_warps,
        )
        kl, row_stats = _merge_partials(partial)
        head_losses = weights * temperatures * temperatures * kl
        if compute_grad:
            wrap_triton(_kd_split_grad_kernel)[(num_rows, num_heads, num_splits)](
                student, teacher, grad, head_offsets, temperatures, weights, row_stats,
                num_cols, num_rows, num_heads,
                REDUCTION=reduction, NUM_SPLITS=num_splits, BLOCK=block, ALIGN=ALIGN,
                num_warps=num_warps,
            )
    return head_losses, grad
