"""``rcfast::fused_linear_multihead_kd``: the torch.library op of the fused linear KD loss.

One op for every fused backend (the backend is an argument: the op runs the
chunk loop of :mod:`rcfast.ops.fused_linear_chunks` with that backend's KD
kernel on each chunk)::

    rcfast::fused_linear_multihead_kd(
        Tensor hidden, Tensor weight, Tensor? bias,
        Tensor? teacher_logits, Tensor? teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias,
        int[] head_sizes, Tensor temperatures, Tensor weights, int reduction,
        bool[] compute_grads, Tensor? row_grad, int max_chunk_logits, str backend)
      -> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)

Inputs are prepared by :mod:`rcfast.ops.fused_linear_kd`: ``hidden [B, D]``,
``weight [N, D]``, ``bias [N]`` share one dtype; the teacher is either
``teacher_logits [B, N]`` (contiguous) or ``teacher_hidden [B, D_t]``,
``teacher_weight [N, D_t]``, ``teacher_bias [N]`` (one dtype, maybe another
than the student's: the teacher's logits are cast to the student's dtype, as
:func:`rcfast.multihead_kd_loss` does); ``temperatures``, ``weights`` float32
``[H]``; ``reduction`` a code of :data:`~rcfast.ops.kernel_contract.REDUCTION_CODES`;
``compute_grads`` which of (dh, dW, db) to compute during the forward (never for
``none``: a per-row loss's gradient depends on the incoming gradient per row);
``row_grad`` (``none`` only) an incoming gradient per row, for the backward's
recompute; ``max_chunk_logits`` the chunk budget (0: default).

Outputs: the loss (float32, float64 for float64; ``[B]`` for ``none``) and the
gradients of the loss for an incoming gradient of 1 (or of
``sum(row_grad * loss)``), in their inputs' dtypes, or empty ``[0]`` tensors
where not computed. The gradient outputs are constants to autograd.

Autograd (:func:`_backward`):

- scalar losses: the gradients computed during the forward, multiplied by the
  incoming gradient; handed over untouched (no copy) when it is exactly 1, in
  plain CPU eager, outside a double backward, and when the graph is not kept
  for another backward (``retain_graph=True`` would let autograd accumulate the
  next backward's gradient into the very buffer handed out again);
- ``none``: the chunk loop again, with the incoming gradient per row (one logits
  GEMM more than the scalar case, like Liger-Kernel's fused cross-entropy);
- ``create_graph=True`` (double backward): the gradient is recomputed through
  the unfused reference (``hidden @ weight.T + bias`` and
  :mod:`rcfast.ops.reference`), which autograd differentiates to any order.
  This materialises the logits once, for that backward only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from rcfast.ops.backends import kernel_op
from rcfast.ops.fused_linear_chunks import LinearTeacher, PackedTeacher, run_chunks
from rcfast.ops.kernel_contract import (
    REDUCTION_CODES, REDUCTION_NAMES, _apply_incoming_gradient, _may_hand_over_buffers, reduction_scale,
)
from rcfast.ops.reference import reduce_row_losses, reference_row_losses

__all__ = ["QUALNAME", "OP_SCHEMA", "fused_linear_multihead_kd", "reference_fused_linear_loss", "teacher_logits_of"]

QUALNAME = "rcfast::fused_linear_multihead_kd"


def _reduction_scale(reduction: int, batch: int, num_heads: int) -> Optional[float]:
    """The scale of the summed loss, or None for per-row losses (the chunk loop's convention)."""
    if reduction == REDUCTION_CODES["none"]:
        return None
    return reduction_scale(reduction, batch, num_heads)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


OP_SCHEMA = (
    "fused_linear_multihead_kd(Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_logits, "
    "Tensor? teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias, int[] head_sizes, "
    "Tensor temperatures, Tensor weights, int reduction, bool[] compute_grads, Tensor? row_grad, "
    "int max_chunk_logits, str backend) -> (Tensor, Tensor, Tensor, Tensor)"
)

# A fragment of the rcfast namespace (rcfast._C defines the rest). The op is
# defined with the plain torch.library API rather than torch.library.custom_op,
# whose kernels are wrapped to disable Dynamo: that imports torch._dynamo (2-7 s
# here) on the first call, in every process that uses the loss.
_LIBRARY = torch.library.Library("rcfast", "FRAGMENT")
_LIBRARY.define(OP_SCHEMA)


def _fused_linear_multihead_kd(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                               teacher_bias, head_sizes, temperatures, weights, reduction, compute_grads,
                               row_grad, max_chunk_logits, backend):
    if teacher_logits is not None:
        teacher = PackedTeacher(teacher_logits)
    else:
        teacher = LinearTeacher(teacher_hidden, teacher_weight, teacher_bias)
    result = run_chunks(
        hidden, weight, bias, teacher, head_sizes, temperatures, weights,
        _reduction_scale(reduction, hidden.shape[0], len(head_sizes)),
        (compute_grads[0], compute_grads[1], compute_grads[2] and bias is not None),
        kernel_op(backend), row_grad=row_grad, max_chunk_logits=max_chunk_logits,
    )
    # Outputs may not alias each other or the inputs: a fresh empty tensor for each one absent.
    return tuple(t if t is not None else hidden.new_empty((0,)) for t in
                 (result.loss, result.grad_hidden, result.grad_weight, result.grad_bias))


# One Python implementation for every device: the chunk loop runs torch ops and
# the backend's kernel op, which dispatch on the tensors' device themselves.
_LIBRARY.impl("fused_linear_multihead_kd", _fused_linear_multihead_kd, "CompositeExplicitAutograd")
fused_linear_multihead_kd = torch.ops.rcfast.fused_linear_multihead_kd.default


@torch.library.register_fake(QUALNAME)
def _fake(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
          head_sizes, temperatures, weights, reduction, compute_grads, row_grad, max_chunk_logits, backend):
    torch._check(hidden.dim() == 2, lambda: "hidden must be 2-D [B, D]")
    torch._check(weight.dim() == 2 and weight.shape[1] == hidden.shape[1],
                 lambda: "weight must be [N, D] with hidden's D")
    torch._check(sum(head_sizes) == weight.shape[0], lambda: "head_sizes must sum to weight's rows")
    loss_dtype = _loss_dtype(hidden.dtype)
    if reduction == REDUCTION_CODES["none"]:
        loss = hidden.new_empty((hidden.shape[0],), dtype=loss_dtype)
    else:
        loss = hidden.new_empty((), dtype=loss_dtype)
    grad_hidden = torch.empty_like(hidden) if compute_grads[0] else hidden.new_empty((0,))
    grad_weight = torch.empty_like(weight) if compute_grads[1] else hidden.new_empty((0,))
    grad_bias = torch.empty_like(bias) if compute_grads[2] and bias is not None else hidden.new_empty((0,))
    return loss, grad_hidden, grad_weight, grad_bias


# --------------------------------------------------------------------------------------
# The unfused reference (also the differentiable path of a double backward)
# --------------------------------------------------------------------------------------

def teacher_logits_of(teacher_logits, teacher_hidden, teacher_weight, teacher_bias) -> torch.Tensor:
    """The teacher's ``[B, N]`` logits, materialised, without gradient."""
    if teacher_logits is not None:
        return teacher_logits.detach()
    with torch.no_grad():
        return F.linear(teacher_hidden, teacher_weight, teacher_bias)


def reference_fused_linear_loss(hidden, weight, bias, teacher_logits, head_sizes, temperatures, weights,
                                reduction: str) -> torch.Tensor:
    """The unfused loss: ``hidden @ weight.T + bias``, then :mod:`rcfast.ops.reference`.

    ``temperatures``/``weights`` are sequences of floats; differentiable to any order.
    """
    logits = F.linear(hidden, weight, bias)
    teacher = teacher_logits.detach().to(logits.dtype)
    rows = reference_row_losses(torch.split(logits, list(head_sizes), dim=1),
                                torch.split(teacher, list(head_sizes), dim=1), temperatures, weights)
    return reduce_row_losses(rows, reduction, len(head_sizes))


# --------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
     head_sizes, temperatures, weights, reduction, compute_grads, _row_grad, max_chunk_logits, backend) = inputs
    _, grad_hidden, grad_weight, grad_bias = output
    # The inputs (for a recompute) cost nothing: they are alive anyway.
    ctx.save_for_backward(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                          temperatures, weights, grad_hidden, grad_weight, grad_bias)
    ctx.head_sizes = list(head_sizes)
    ctx.reduction = reduction
    ctx.max_chunk_logits = max_chunk_logits
    ctx.backend = backend
    # The gradient outputs never receive a gradient: without this autograd would
    # allocate and zero dW-sized tensors for them on every backward.
    ctx.set_materialize_grads(False)


def _plain_eager(tensor: torch.Tensor) -> bool:
    return (type(tensor) is torch.Tensor and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


def _hand_over(buffers, grad_loss):
    """The forward's gradients times the (scalar) incoming gradient, with the dense
    op's rules (rcfast.ops.kernel_contract): when nothing can read the saved buffers
    again they are scaled in place (no dW-sized temporary) or, for an incoming
    gradient of exactly 1 on the CPU, handed over untouched."""
    hand_over = _may_hand_over_buffers()
    return [None if b is None else _apply_incoming_gradient(b, grad_loss, False, hand_over) for b in buffers]


def _backward(ctx, grad_loss, _grad_hidden, _grad_weight, _grad_bias):
    (hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
     temperatures, weights, grad_hidden, grad_weight, grad_bias) = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
    result = [None] * 15
    if grad_loss is None or not any(needs):
        return tuple(result)
    reduction_name = REDUCTION_NAMES[ctx.reduction]

    if torch.is_grad_enabled() and _plain_eager(grad_loss):
        # create_graph=True: a differentiable gradient, through the unfused reference.
        inputs = [x for x, need in zip((hidden, weight, bias), needs) if need]
        teacher = teacher_logits_of(teacher_logits, teacher_hidden, teacher_weight, teacher_bias)
        loss = reference_fused_linear_loss(hidden, weight, bias, teacher, ctx.head_sizes,
                                           temperatures.tolist(), weights.tolist(), reduction_name)
        computed = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True))
        grads = [next(computed) if need else None for need in needs]
    elif reduction_name == "none":
        # Per-row losses: the weight's gradient sums rows weighted by the incoming
        # gradient, unknown during the forward, so the chunks run again with it.
        _, dh, dw, db = fused_linear_multihead_kd(
            hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
            teacher_logits, teacher_hidden, teacher_weight, teacher_bias, ctx.head_sizes,
            temperatures, weights, ctx.reduction, list(needs), grad_loss, ctx.max_chunk_logits, ctx.backend)
        grads = [g if need else None for g, need in zip((dh, dw, db), needs)]
    else:
        buffers = [g if need else None for g, need in zip((grad_hidden, grad_weight, grad_bias), needs)]
        if any(b is not None and b.numel() == 0 for b in buffers):
            raise RuntimeError("rcfast: the fused linear KD loss was computed without the gradients "
                               "a backward pass now asks for")
        grads = _hand_over(buffers, grad_loss)
    result[0], result[1], result[2] = grads
    return tuple(result)


torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context)
