"""The chunk plan and chunk loop of the fused linear + multi-head KD loss.

``loss = multihead_kd_loss(hidden @ weight.T + bias, teacher_logits, ...)``
computed so that the ``[B, N]`` logits never exist (Liger-Kernel's fused linear
losses, DESIGN.md "Variants of the op"):

- **Rows in chunks.** A chunk of ``rows`` rows holds at most ``budget`` logits
  (:func:`plan_chunks`). Per chunk: one GEMM for the student's logits (and one
  for the teacher's when the teacher is a linear layer too), the backend's fused
  KD kernel on them, which writes the logits' gradient ``g``, then
  ``d_hidden[chunk] = g @ W``, ``dW.addmm_(g.T, h_chunk)`` in place and
  ``db += g.sum(0)``. The gradients are finished when the forward is.
- **Heads wider than the budget** (one row of them does not fit) are cut along
  classes into blocks. A block's partial softmax statistics (running max, sum of
  exps, and the KL term ``A``, as in DESIGN.md "The kernel algorithm") are
  merged across blocks with the online log-sum-exp; once the head's statistics
  are final, its blocks' logits are computed again for the gradient (one GEMM
  more for those heads only: the price of not holding them).

Math is float32 (float64 stays float64); GEMMs run in the inputs' dtype and
accumulate in float32 inside each call. ``dW`` is accumulated across row
chunks in the weight's dtype (see docs/fused_linear.md for what that costs in
bfloat16); ``db`` and a split chunk's ``d_hidden`` in float32.

This module knows nothing of autograd or of ``torch.library``: the op around it
is :mod:`rcfast.ops.fused_linear_op`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "MIN_CHUNK_LOGITS", "CPU_MIN_CHUNK_ROWS", "CPU_MAX_FLOOR_LOGITS", "CHUNK_BUFFERS_SHARE", "SPLIT_ROWS", "ColumnGroup", "ChunkPlan",
    "default_chunk_logits", "plan_chunks", "PackedTeacher", "LinearTeacher", "TeacherBlocks", "ChunkResult",
    "run_chunks",
]

# The smallest default budget (logits per chunk) on GPUs: below it GEMMs are too
# thin to run at speed, and the memory saved is negligible anyway (1 MiB of float32).
MIN_CHUNK_LOGITS = 1 << 18

# On CPUs: chunks of fewer rows make the GEMMs memory-bound (W and dW are streamed
# once per chunk), unless that floor alone would hold more than 64 MiB of float32.
CPU_MIN_CHUNK_ROWS = 128
CPU_MAX_FLOOR_LOGITS = 1 << 24

# The chunk-sized buffers alive at once hold at most 1 / CHUNK_BUFFERS_SHARE of
# all the logits by default (12.5 %, under the 15 %): a chunk holds 1/16
# of the logits with two such buffers (the student's logits and their gradient),
# 1/24 with three (also the teacher's logits, computed or cast per chunk).
CHUNK_BUFFERS_SHARE = 8

# Rows per chunk when heads are split along classes: enough rows for the block
# GEMMs to be matrix products rather than matrix-vector products.
SPLIT_ROWS = 16

# The kernel contract's reduction codes (rcfast.ops.kernel_contract.REDUCTION_CODES).
_NONE, _SUM = 0, 1


# --------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ColumnGroup:
    """Packed columns ``[begin, end)`` handled together in a chunk.

    Either whole heads (``heads``: their indices; ``split_head`` is None), which
    the fused kernel finishes in one pass, or one block of a head too wide for
    the budget (``split_head``: that head's index; ``heads`` is empty).
    """

    begin: int
    end: int
    heads: tuple[int, ...] = ()
    split_head: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """How the ``[B, N]`` logits are walked: ``rows`` rows at a time, ``groups`` of columns."""

    rows: int
    groups: tuple[ColumnGroup, ...]

    @property
    def splits_heads(self) -> bool:
        return any(group.split_head is not None for group in self.groups)


def default_chunk_logits(batch: int, dim: int, num_classes: int, device_type: str = "cpu",
                         buffers: int = 3) -> int:
    """The default budget of logits per chunk.

    At most ``1 / (buffers * CHUNK_BUFFERS_SHARE)`` of all the logits, so that
    the ``buffers`` chunk-sized buffers alive at once (the student's logits,
    their gradient and, for a teacher given as a linear layer or in another
    dtype, its logits) stay within 12.5 % of the logits. On GPUs, Liger-Kernel's heuristic within that: about the size of the
    input activations (``B * D``: rows ~ ``B / ceil(N / D)``), and at least
    :data:`MIN_CHUNK_LOGITS`. On CPUs the cap itself: every chunk streams ``W``
    twice (logits and ``dh`` GEMMs) and reads and writes all of ``dW``, so thin
    chunks are memory-bound, and fewer, larger ones faster (docs/fused_linear.md);
    at least :data:`CPU_MIN_CHUNK_ROWS` rows (up to :data:`CPU_MAX_FLOOR_LOGITS`).
    """
    memory_cap = -(-batch * num_classes // (buffers * CHUNK_BUFFERS_SHARE))
    if device_type == "cpu":
        return max(memory_cap, min(CPU_MIN_CHUNK_ROWS * num_classes, CPU_MAX_FLOOR_LOGITS))
    return max(min(batch * dim, memory_cap), MIN_CHUNK_LOGITS)


def _even_rows(batch: int, max_rows: int) -> int:
    """Rows per chunk, at most ``max_rows``, spread evenly over the chunks: no thin
    last chunk, whose GEMMs would run at a fraction of the others' rate (4096 rows
    at most 170 a chunk: 25 chunks of 164 rather than 24 of 170 and one of 16)."""
    chunks = -(-batch // max(1, min(batch, max_rows)))
    return -(-batch // chunks)


def plan_chunks(batch: int, dim: int, head_sizes: Sequence[int], max_chunk_logits: int = 0,
                device_type: str = "cpu", buffers: int = 3) -> ChunkPlan:
    """Rows per chunk and column groups for ``batch`` rows, ``dim`` features, these heads.

    ``max_chunk_logits`` (0: :func:`default_chunk_logits` for ``buffers``
    chunk-sized buffers) bounds the logits a chunk holds at once. When one row of all heads fits, chunks are whole rows
    and there is one group (the rows spread evenly over the chunks); otherwise chunks have :data:`SPLIT_ROWS` rows,
    consecutive heads are grouped while they fit the width ``budget // rows``, and
    wider heads are cut into blocks of at most that width.
    """
    num_classes = sum(head_sizes)
    budget = (max_chunk_logits if max_chunk_logits > 0
              else default_chunk_logits(batch, dim, num_classes, device_type, buffers))
    if budget >= num_classes:
        rows = _even_rows(batch, budget // num_classes)
        everything = ColumnGroup(0, num_classes, heads=tuple(range(len(head_sizes))))
        return ChunkPlan(rows=rows, groups=(everything,))

    rows = _even_rows(batch, SPLIT_ROWS)
    width = max(1, budget // rows)
    groups: list[ColumnGroup] = []
    pending: list[int] = []  # consecutive whole heads not yet closed into a group
    pending_begin = begin = 0

    def close_pending():
        if pending:
            groups.append(ColumnGroup(pending_begin, begin, heads=tuple(pending)))
            pending.clear()

    for head, size in enumerate(head_sizes):
        if size > width:
            close_pending()
            num_blocks = -(-size // width)
            block = -(-size // num_blocks)  # near-equal blocks, each <= width
            for start in range(begin, begin + size, block):
                groups.append(ColumnGroup(start, min(start + block, begin + size), split_head=head))
        else:
            if begin - pending_begin + size > width:
                close_pending()
            if not pending:
                pending_begin = begin
            pending.append(head)
        begin += size
    close_pending()
    return ChunkPlan(rows=rows, groups=tuple(groups))


# --------------------------------------------------------------------------------------
# Teachers: where a chunk's teacher logits come from
# --------------------------------------------------------------------------------------

class TeacherBlocks:
    """A source of the teacher's logits, one ``[rows, columns]`` block at a time.

    ``block(r0, r1, c0, c1, dtype)`` returns rows ``r0:r1`` and packed columns
    ``c0:c1`` of the teacher's logits, contiguous, in ``dtype``. New teacher
    forms (e.g. a top-k teacher, densified per block) implement this.
    """

    def block(self, r0: int, r1: int, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def chunk_buffers(self, dtype: torch.dtype) -> int:
        """How many chunk-sized buffers a block in ``dtype`` allocates (0: a view), for the plan."""
        raise NotImplementedError


class PackedTeacher(TeacherBlocks):
    """Teacher logits given as one ``[B, N]`` tensor: blocks are slices (no copy for whole rows)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def block(self, r0, r1, c0, c1, dtype):
        return self.logits[r0:r1, c0:c1].to(dtype).contiguous()

    def chunk_buffers(self, dtype):
        # Whole rows in the same dtype are views; a cast is a copy.
        return 0 if self.logits.dtype == dtype else 1


class LinearTeacher(TeacherBlocks):
    """Teacher given as its last linear layer: blocks are computed (``t = h_t @ W_t.T + b_t``)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias

    def block(self, r0, r1, c0, c1, dtype):
        return _linear_block(self.hidden[r0:r1], self.weight, self.bias, c0, c1).to(dtype)

    def chunk_buffers(self, dtype):
        # Computed; a cast to another dtype frees the product right away.
        return 1


def _linear_block(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], c0: int, c1: int):
    """``h @ weight[c0:c1].T + bias[c0:c1]`` in one GEMM."""
    if bias is None:
        return torch.mm(h, weight[c0:c1].t())
    return torch.addmm(bias[c0:c1], h, weight[c0:c1].t())


# --------------------------------------------------------------------------------------
# Split heads: partial softmax statistics, merged online
# --------------------------------------------------------------------------------------

def _shift(running_max: torch.Tensor) -> torch.Tensor:
    # Sums are taken relative to the running max, or to 0 while it is -inf (then
    # every exp is exp(-inf) = 0 rather than exp(-inf + inf) = NaN).
    return torch.where(running_max == float("-inf"), torch.zeros_like(running_max), running_max)


@dataclasses.dataclass
class _HeadStats:
    """Per-row online statistics of one head: ``x = logits / tau``, sums relative to ``_shift(max)``.

    ``a`` is ``sum exp(x_t - shift_t) * (x_t - x_s)`` over classes with teacher
    mass, so that ``KL = a / l_t - lse_t + lse_s`` (DESIGN.md). ``student_inf``:
    the row has a student -inf under a finite teacher logit, which makes the KL
    +inf however small that teacher probability (decided on the logits, as in
    :mod:`rcfast.ops.reference`).
    """

    m_s: torch.Tensor
    l_s: torch.Tensor
    m_t: torch.Tensor
    l_t: torch.Tensor
    a: torch.Tensor
    student_inf: torch.Tensor

    @classmethod
    def of_block(cls, student: torch.Tensor, teacher: torch.Tensor, tau: torch.Tensor, compute_dtype):
        # In place where possible: three block-sized float32 buffers at most.
        # Out of place first: a block may be a view of the caller's teacher logits.
        x_s = student.to(compute_dtype) / tau
        x_t = teacher.to(compute_dtype) / tau
        m_s = x_s.amax(dim=1)  # amax propagates NaN: a NaN logit poisons the head
        m_t = x_t.amax(dim=1)
        l_s = torch.exp(x_s - _shift(m_s).unsqueeze(1)).sum(dim=1)
        e_t = torch.exp(x_t - _shift(m_t).unsqueeze(1))
        l_t = e_t.sum(dim=1)
        term = x_s.neg_().add_(x_t).mul_(e_t)  # e_t * (x_t - x_s)
        # Where the teacher has no mass the term is 0, even if x_t - x_s is NaN
        # (-inf - -inf) or -inf; `e_t == 0` (not `> 0`) keeps a NaN teacher NaN.
        term.masked_fill_(e_t == 0, 0.0)
        student_inf = (torch.isneginf(student) & (teacher > float("-inf"))).any(dim=1)
        return cls(m_s, l_s, m_t, l_t, term.sum(dim=1), student_inf)

    def merge(self, other: "_HeadStats") -> "_HeadStats":
        """Both states brought to the larger max (the online log-sum-exp)."""
        m_s = torch.maximum(self.m_s, other.m_s)  # NaN-propagating
        m_t = torch.maximum(self.m_t, other.m_t)
        # A factor is exp(m_old - shift_new): 0 for a state that has seen only -inf.
        f_s, g_s = torch.exp(self.m_s - _shift(m_s)), torch.exp(other.m_s - _shift(m_s))
        f_t, g_t = torch.exp(self.m_t - _shift(m_t)), torch.exp(other.m_t - _shift(m_t))
        zero = torch.zeros_like(self.a)
        # An A whose weight underflows to 0 is dropped (it may be +inf from a
        # student -inf under teacher mass that is now negligible, as in the kernels).
        a = torch.where(f_t == 0, zero, self.a * f_t) + torch.where(g_t == 0, zero, other.a * g_t)
        return _HeadStats(m_s, self.l_s * f_s + other.l_s * g_s, m_t, self.l_t * f_t + other.l_t * g_t, a,
                          self.student_inf | other.student_inf)

    def kl(self) -> torch.Tensor:
        """``KL(p_t || p_s)`` per row, with the degenerate heads of :mod:`rcfast.ops.reference`."""
        kl = (self.a / self.l_t - (_shift(self.m_t) - _shift(self.m_s))
              - torch.log(self.l_t) + torch.log(self.l_s))
        kl = torch.where(self.l_s == 0, torch.full_like(kl, float("inf")), kl)
        kl = torch.where(self.student_inf, kl + float("inf"), kl)  # a NaN stays NaN
        # A fully masked teacher head (l_t = 0) adds 0, unless the student has a NaN.
        return torch.where(self.l_t == 0, torch.where(torch.isnan(self.l_s), self.l_s, torch.zeros_like(kl)), kl)

    def grad(self, student, teacher, tau, coef, compute_dtype) -> torch.Tensor:
        """``coef * (softmax(x_s) - softmax(x_t))`` of one block, with the final statistics.

        ``coef`` is ``[rows, 1]`` or a scalar. A head without teacher mass gets 0;
        a student head without mass gets ``-coef * p_t`` (as the kernels do).
        """
        log_l_s = torch.where(self.l_s == 0, torch.zeros_like(self.l_s), torch.log(self.l_s))
        log_l_t = torch.where(self.l_t == 0, torch.zeros_like(self.l_t), torch.log(self.l_t))
        # exp((x - shift) - log l), in that order, like log_softmax (no folded lse).
        p_s = (student.to(compute_dtype) / tau).sub_(_shift(self.m_s).unsqueeze(1))
        p_s = p_s.sub_(log_l_s.unsqueeze(1)).exp_()
        p_t = (teacher.to(compute_dtype) / tau).sub_(_shift(self.m_t).unsqueeze(1))
        p_t = p_t.sub_(log_l_t.unsqueeze(1)).exp_()
        g = p_s.sub_(p_t).mul_(coef)
        return g.masked_fill_((self.l_t == 0).unsqueeze(1), 0.0)


# --------------------------------------------------------------------------------------
# The chunk loop
# --------------------------------------------------------------------------------------

ChunkKernel = Callable[..., tuple]
"""A fused KD kernel op of :mod:`rcfast.ops.kernel_contract` (``loss, grad = k(s, t, offsets, taus, ws, red, grad)``)."""


@dataclasses.dataclass
class ChunkResult:
    loss: torch.Tensor
    grad_hidden: Optional[torch.Tensor]
    grad_weight: Optional[torch.Tensor]
    grad_bias: Optional[torch.Tensor]


class _Gradients:
    """The gradient buffers and how a chunk's logits gradient ``g`` is folded into them."""

    def __init__(self, hidden, weight, bias, needs, accumulate_dtype):
        need_hidden, need_weight, need_bias = needs
        self.hidden = torch.empty_like(hidden) if need_hidden else None
        # dW is written by mm(out=) for the first row chunk and addmm_'d for the
        # others (no zero-fill pass over a dW-sized buffer).
        self.weight = torch.empty_like(weight) if need_weight else None
        self.bias_accumulator = (torch.zeros(bias.shape[0], dtype=accumulate_dtype, device=bias.device)
                                 if need_bias else None)
        self.bias_dtype = None if bias is None else bias.dtype
        self.accumulate_dtype = accumulate_dtype
        # ATen's fallback GEMM for bfloat16/float16 (CPUs without native half-precision
        # BLAS, e.g. AVX2) runs ``g @ W`` at ~0.5 GFLOP/s with g row-major but ~20
        # with g column-major: a transposed copy of the chunk's g (chunk-sized) pays.
        self.column_major_dh = hidden.device.type == "cpu" and hidden.dtype in (torch.bfloat16, torch.float16)

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias_accumulator is not None

    def add_block(self, g, *, h, weight, r0, c0, c1, scale, first_row_chunk, hidden_accumulator):
        """Fold ``scale * g``, ``g = dL/d logits[r0:r0+R, c0:c1]`` unscaled, into dh, dW and db.

        The reduction's scale (1/B, ...) is the GEMMs' ``alpha``, a double: exact
        for float64 (gradcheck), and the kernels' gradient is not scaled down
        before it is rounded to a half-precision dtype.
        """
        if self.hidden is not None:
            g_dh = g.t().contiguous().t() if self.column_major_dh else g
            if hidden_accumulator is None:  # the chunk's only group: write dh directly
                out = self.hidden[r0:r0 + g.shape[0]]
                torch.addmm(out, g_dh, weight[c0:c1], beta=0, alpha=scale, out=out)
            else:
                hidden_accumulator.add_(torch.mm(g_dh, weight[c0:c1]), alpha=scale)
            del g_dh
        if self.weight is not None:
            out = self.weight[c0:c1]
            # beta=0: the first row chunk writes (the buffer is uninitialised), the others add.
            out.addmm_(g.t(), h, beta=0 if first_row_chunk else 1, alpha=scale)
        if self.bias_accumulator is not None:
            self.bias_accumulator[c0:c1].add_(g.sum(dim=0, dtype=self.accumulate_dtype), alpha=scale)

    def finish(self):
        bias = None if self.bias_accumulator is None else self.bias_accumulator.to(self.bias_dtype)
        return self.hidden, self.weight, bias


def run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    teacher: TeacherBlocks,
    head_sizes: Sequence[int],
    temperatures: torch.Tensor,
    weights: torch.Tensor,
    reduction_scale: Optional[float],
    needs: tuple[bool, bool, bool],
    kernel: ChunkKernel,
    row_grad: Optional[torch.Tensor] = None,
    max_chunk_logits: int = 0,
) -> ChunkResult:
    """Loss and (optionally) gradients of the fused linear multi-head KD loss.

    Args:
        hidden, weight, bias: ``[B, D]``, ``[N, D]``, ``[N]`` or None, one dtype.
        teacher: where the teacher's logits come from (:class:`TeacherBlocks`).
        head_sizes: ``[C_1, ..., C_H]``, summing to N.
        temperatures, weights: float32 ``[H]`` on the inputs' device.
        reduction_scale: None for per-row losses (``"none"``: the loss is
            ``[B]``); else the scale of the summed loss (1, 1/B, 1/(B*H)): the
            kernels run with ``"sum"`` and the scale is applied to their sums
            and, as the GEMMs' ``alpha``, to the gradients.
        needs: which of (dh, dW, db) to compute.
        kernel: the backend's fused KD kernel op, run on each chunk.
        row_grad: with ``reduction_scale=None``, an incoming gradient per row
            ``[B]``: the gradients are then those of ``sum(row_grad * loss)``.
        max_chunk_logits: the chunk budget (0: the default, :func:`plan_chunks`).
    """
    if row_grad is not None and reduction_scale is not None:
        raise ValueError("row_grad goes with per-row losses (reduction 'none')")
    loop = _ChunkLoop(hidden, weight, bias, teacher, head_sizes, temperatures, weights, reduction_scale,
                      _Gradients(hidden, weight, bias, needs, _compute_dtype(hidden.dtype)), kernel,
                      plan_chunks(hidden.shape[0], hidden.shape[1], head_sizes, max_chunk_logits,
                                  hidden.device.type, 2 + teacher.chunk_buffers(hidden.dtype)))
    for r0 in range(0, hidden.shape[0], loop.plan.rows):
        loop.run_rows(r0, min(r0 + loop.plan.rows, hidden.shape[0]), row_grad)
    grad_hidden, grad_weight, grad_bias = loop.grads.finish()
    return ChunkResult(loop.loss(), grad_hidden, grad_weight, grad_bias)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChunkLoop:
    """The state of one call: the plan, per-group kernel tables, the loss so far, the gradients."""

    def __init__(self, hidden, weight, bias, teacher, head_sizes, temperatures, weights, reduction_scale,
                 grads: _Gradients, kernel, plan: ChunkPlan):
        self.hidden, self.weight, self.bias, self.teacher = hidden, weight, bias, teacher
        self.temperatures, self.weights, self.grads, self.kernel, self.plan = temperatures, weights, grads, kernel, plan
        self.dtype = hidden.dtype
        self.compute_dtype = _compute_dtype(hidden.dtype)
        self.per_row = reduction_scale is None
        self.scale = 1.0 if self.per_row else float(reduction_scale)
        self.kernel_reduction = _NONE if self.per_row else _SUM
        device = hidden.device
        offsets = [0]
        for size in head_sizes:
            offsets.append(offsets[-1] + size)
        # The kernel's small tables for each group of whole heads, built once per call.
        self.group_tables = {}
        for group in plan.groups:
            if group.split_head is None:
                relative = [offsets[h] - group.begin for h in group.heads] + [group.end - group.begin]
                heads = torch.tensor(group.heads, dtype=torch.int64, device=device)
                self.group_tables[group.begin] = (torch.tensor(relative, dtype=torch.int64, device=device),
                                                  temperatures[heads].contiguous(), weights[heads].contiguous())
        self.split_heads = sorted({g.split_head for g in plan.groups if g.split_head is not None})
        # Per head: the gradient's w * tau and the loss's w * tau^2 (the scale is applied later).
        self.coefs = weights * temperatures
        self.loss_weights = weights * temperatures * temperatures
        self.row_losses = torch.zeros(hidden.shape[0], dtype=self.compute_dtype, device=device)
        self.total = torch.zeros((), dtype=self.compute_dtype, device=device)

    def loss(self) -> torch.Tensor:
        return self.row_losses if self.per_row else self.total * self.scale

    def _add_loss(self, r0, r1, loss):
        if self.per_row:
            self.row_losses[r0:r1] += loss.to(self.compute_dtype)
        else:
            self.total += loss.sum().to(self.compute_dtype)

    def run_rows(self, r0: int, r1: int, row_grad: Optional[torch.Tensor]) -> None:
        """Loss and gradients of rows ``r0:r1``: every column group, then the split heads."""
        h = self.hidden[r0:r1]
        chunk_row_grad = None if row_grad is None else row_grad[r0:r1].to(self.compute_dtype).unsqueeze(1)
        hidden_accumulator = None  # with several groups a chunk's dh is a float32 sum over them
        if self.grads.hidden is not None and len(self.plan.groups) > 1:
            hidden_accumulator = torch.zeros((r1 - r0, h.shape[1]), dtype=self.compute_dtype, device=h.device)
        fold = dict(h=h, weight=self.weight, r0=r0, scale=self.scale, first_row_chunk=r0 == 0,
                    hidden_accumulator=hidden_accumulator)
        stats: dict[int, _HeadStats] = {}
        for group in self.plan.groups:
            c0, c1 = group.begin, group.end
            student = _linear_block(h, self.weight, self.bias, c0, c1)
            target = self.teacher.block(r0, r1, c0, c1, self.dtype)
            if group.split_head is not None:
                head = group.split_head
                block = _HeadStats.of_block(student, target, self.temperatures[head].to(self.compute_dtype),
                                            self.compute_dtype)
                stats[head] = block if head not in stats else stats[head].merge(block)
                continue
            loss, g = self.kernel(student, target, *self.group_tables[c0], self.kernel_reduction, self.grads.any)
            del student, target  # before the GEMMs: only g is chunk-sized from here on
            self._add_loss(r0, r1, loss)
            if self.grads.any:
                if chunk_row_grad is not None:
                    g = g.mul_(chunk_row_grad)
                self.grads.add_block(g, c0=c0, c1=c1, **fold)
            del g

        for head in self.split_heads:
            kl = stats[head].kl()
            # A head of weight 0 adds exactly 0, even where its KL is +inf (0 * inf
            # is NaN); a NaN still propagates (rcfast.ops.reference's rule).
            head_loss = torch.where(self.weights[head] == 0, torch.where(torch.isnan(kl), kl, 0.0),
                                    self.loss_weights[head].to(self.compute_dtype) * kl)
            self._add_loss(r0, r1, head_loss)
        if self.grads.any and self.split_heads:
            # The split heads' statistics are final: their blocks again, for the gradient.
            for group in self.plan.groups:
                if group.split_head is None:
                    continue
                c0, c1, head = group.begin, group.end, group.split_head
                student = _linear_block(h, self.weight, self.bias, c0, c1)
                target = self.teacher.block(r0, r1, c0, c1, self.dtype)
                coef = self.coefs[head].to(self.compute_dtype)
                if chunk_row_grad is not None:
                    coef = coef * chunk_row_grad
                g = stats[head].grad(student, target, self.temperatures[head].to(self.compute_dtype), coef,
                                     self.compute_dtype).to(self.dtype)
                del student, target
                self.grads.add_block(g, c0=c0, c1=c1, **fold)
                del g
        if hidden_accumulator is not None:
            self.grads.hidden[r0:r1] = hidden_accumulator
