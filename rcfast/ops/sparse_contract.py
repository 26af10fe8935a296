"""The contract every sparse (top-k teacher) kernel backend implements, and its
torch.library glue: fake implementation and autograd formula.

Each backend (``cpu`` and ``cuda`` in ``rcfast._C``, ``triton`` in
``rcfast.kernels``) registers one custom op with :data:`SPARSE_OP_SCHEMA`::

    rcfast::<name>(Tensor student, Tensor teacher_values, Tensor teacher_indices,
                   Tensor head_offsets, Tensor temperatures, Tensor weights,
                   int reduction, bool compute_grad) -> (Tensor loss, Tensor grad)

Inputs (prepared by :mod:`rcfast.ops.sparse_kd`):

- ``student``: ``[B, N]`` contiguous packed logits (float32, float16, bfloat16;
  the CPU kernel also takes float64).
- ``teacher_values``: ``[B, H, k]`` contiguous, the student's dtype: the
  teacher's logits at ``teacher_indices``; ``-inf`` marks padding.
- ``teacher_indices``: ``[B, H, k]`` contiguous int32 or int64, the class of each
  entry within its head (``0 <= idx < C_h``; not read for padding). Indices
  must be distinct within a (row, head): kernels do not check that (the
  reference and ``validate=True`` do), but with repeats they still compute the
  stated loss, whose gradient then scatter-adds the repeated entries' mass.
  An index out of range is a ``ValueError`` on the CPU; GPU kernels cannot
  raise without a host synchronisation, so there the (row, head) gets a NaN
  loss and gradient instead (never an out-of-bounds access).
- ``head_offsets`` int64 ``[H + 1]``, ``temperatures``/``weights`` float32
  ``[H]``, ``reduction`` and ``compute_grad``: as in
  :mod:`rcfast.ops.kernel_contract`.

Outputs: as in :mod:`rcfast.ops.kernel_contract`: ``loss`` (float32; float64
for float64 inputs), and ``grad``, the gradient of the loss for an incoming
gradient of 1, ``scale * w_h * tau_h * (softmax(s_h / tau_h) - scatter(p_h))``
in the student's dtype (empty ``[0]`` without ``compute_grad``).

Autograd: the backward multiplies ``grad`` by the incoming gradient (handing
the buffer itself over, with no copy, when that is safe: plain CPU eager, an
incoming gradient of exactly 1, and a graph that is not kept for another
backward). It is itself differentiable: a gradient arriving at the ``grad``
output (double backward: gradient penalties, meta-learning) gets the
Hessian-vector product of the softened KL,
``scale * w_h * (q * v - q * <q, v>_head)`` with ``q = softmax(s_h / tau_h)``,
where ``q`` is recovered from the saved buffer as ``grad / coef + scatter(p)``
(nothing else is saved beyond the small teacher tensors).
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from rcfast.ops.kernel_contract import REDUCTION_CODES
from rcfast.ops.sparse_reference import sparse_teacher_log_probs

__all__ = ["SPARSE_OP_SCHEMA", "INDEX_DTYPES", "fake_sparse_kernel", "register_sparse_op_meta"]

SPARSE_OP_SCHEMA = (
    "(Tensor student, Tensor teacher_values, Tensor teacher_indices, Tensor head_offsets, "
    "Tensor temperatures, Tensor weights, int reduction, bool compute_grad) -> (Tensor, Tensor)"
)

INDEX_DTYPES = (torch.int32, torch.int64)

_NUM_INPUTS = 8


def _loss_dtype(student_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if student_dtype == torch.float64 else torch.float32


def fake_sparse_kernel(student, teacher_values, teacher_indices, head_offsets, temperatures, weights,
                       reduction, compute_grad):
    """Shape/dtype-only implementation used by torch.compile and opcheck."""
    torch._check(student.dim() == 2, lambda: "student must be 2-D [B, N]")
    torch._check(teacher_values.dim() == 3, lambda: "teacher_values must be 3-D [B, H, k]")
    torch._check(teacher_indices.shape == teacher_values.shape,
                 lambda: "teacher_indices must match teacher_values' shape")
    torch._check(teacher_values.shape[0] == student.shape[0], lambda: "one teacher row per student row")
    torch._check(teacher_indices.dtype in INDEX_DTYPES, lambda: "teacher_indices must be int32 or int64")
    num_heads = head_offsets.shape[0] - 1
    torch._check(teacher_values.shape[1] == num_heads, lambda: "teacher_values needs one slice per head")
    torch._check(temperatures.shape[0] == num_heads, lambda: "one temperature per head")
    torch._check(weights.shape[0] == num_heads, lambda: "one weight per head")
    loss_dtype = _loss_dtype(student.dtype)
    if reduction == REDUCTION_CODES["none"]:
        loss = student.new_empty((student.shape[0],), dtype=loss_dtype)
    else:
        loss = student.new_empty((), dtype=loss_dtype)
    grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    _, teacher_values, teacher_indices, head_offsets, temperatures, weights, reduction, _ = inputs
    _, grad = output
    # The gradient buffer, and what a double backward needs besides it (all small).
    ctx.save_for_backward(grad, teacher_values, teacher_indices, head_offsets, temperatures, weights)
    ctx.reduction = reduction
    # The gradient buffer output rarely receives a gradient; without this,
    # autograd would allocate and zero a [B, N] tensor for it on every backward.
    ctx.set_materialize_grads(False)


def _hand_over_is_safe(grad_loss: torch.Tensor) -> bool:
    """Whether the saved gradient buffer may be returned as the student's gradient.

    Only in plain CPU eager (reading the incoming gradient's value is free
    there, a host sync on a GPU and impossible under tracing), for an incoming
    gradient of exactly 1, outside a double backward, and when the graph is
    not kept: with ``retain_graph=True`` autograd would accumulate the next
    backward's gradient into the very buffer this node hands out again.
    """
    return (
        type(grad_loss) is torch.Tensor
        and grad_loss.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
        and not torch.is_grad_enabled()
        and not torch._C._autograd._get_current_graph_task_keep_graph()
        and grad_loss.item() == 1.0
    )


def _scaled_by_reduction(per_head: torch.Tensor, reduction: int, batch, num_heads) -> torch.Tensor:
    """``per_head`` times the reduction's scale (1; 1/B for batchmean; 1/(B*H) for mean).

    Tensor ops on the (possibly symbolic) sizes: no Python float is made of them,
    so the formula traces under torch.compile with dynamic shapes.
    """
    if reduction == REDUCTION_CODES["batchmean"]:
        return per_head / batch
    if reduction == REDUCTION_CODES["mean"]:
        return per_head / (batch * num_heads)
    return per_head


def _column_heads(head_offsets: torch.Tensor, num_cols: int) -> torch.Tensor:
    """``[N]`` int64: the head of every packed column."""
    columns = torch.arange(num_cols, device=head_offsets.device)
    return torch.searchsorted(head_offsets[1:], columns, right=True)


def _hessian_vector_product(grad, vector, teacher_values, teacher_indices, head_offsets, temperatures,
                            weights, reduction):
    """``d<grad, vector>/d student``: ``scale * w_h * (q * v - q * <q, v>_head)`` per head.

    ``q = softmax(s_h / tau_h)`` is recovered from the gradient buffer,
    ``grad = coef_h * (q - scatter(p))`` with ``coef_h = scale * w_h * tau_h``. A
    head with ``w_h = 0`` has no Hessian (and no ``q`` to recover). Built from
    differentiable torch ops on ``grad`` (an output of the op), so higher
    derivatives come back through the op again.
    """
    batch, num_cols = grad.shape
    num_heads = head_offsets.shape[0] - 1
    compute_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    column_head = _column_heads(head_offsets, num_cols)
    curvature = _scaled_by_reduction(weights.to(compute_dtype), reduction, batch, num_heads)  # scale * w_h
    coef = curvature * temperatures.to(compute_dtype)                       # scale * w_h * tau_h
    safe_coef = torch.where(coef == 0, torch.ones_like(coef), coef)

    # scatter(p): the teacher's probabilities on the packed columns.
    scaled = teacher_values.detach().to(compute_dtype) / temperatures.to(compute_dtype).view(1, -1, 1)
    log_p, _ = sparse_teacher_log_probs(scaled)
    p = log_p.exp()
    is_entry = p != 0
    columns = head_offsets[:-1].view(1, -1, 1) + torch.where(is_entry, teacher_indices.to(torch.int64), 0)
    p_dense = torch.zeros((batch, num_cols), dtype=compute_dtype, device=grad.device)
    p_dense = p_dense.scatter_add(1, columns.reshape(batch, -1), torch.where(is_entry, p, 0).reshape(batch, -1))

    q = grad.to(compute_dtype) / safe_coef[column_head] + p_dense
    v = vector.to(compute_dtype)
    qv = q * v
    head_dot = torch.zeros((batch, num_heads), dtype=compute_dtype, device=grad.device)
    head_dot = head_dot.index_add(1, column_head, qv)
    hvp = curvature[column_head] * (qv - q * head_dot[:, column_head])
    return hvp.to(grad.dtype)


def _backward(ctx, grad_loss, grad_of_grad):
    grad, teacher_values, teacher_indices, head_offsets, temperatures, weights = ctx.saved_tensors
    grad_student = None
    if grad_loss is not None:
        if grad.numel() == 0 and grad_loss.numel() != 0:
            raise RuntimeError(
                "rcfast: the sparse KD loss was computed without its gradient (compute_grad=False) "
                "but a backward pass reached it")
        if grad_loss.dim() == 0:
            # loss.backward() on the reduced loss (the common case): the kernel wrote
            # the final gradient already; hand it over when no one will read it again.
            grad_student = grad if _hand_over_is_safe(grad_loss) else grad * grad_loss.to(grad.dtype)
        else:
            grad_student = grad * grad_loss.to(grad.dtype).unsqueeze(1)
    if grad_of_grad is not None:
        hvp = _hessian_vector_product(grad, grad_of_grad, teacher_values, teacher_indices, head_offsets,
                                      temperatures, weights, ctx.reduction)
        grad_student = hvp if grad_student is None else grad_student + hvp
    return (grad_student,) + (None,) * (_NUM_INPUTS - 1)


def register_sparse_op_meta(qualname: str, *, register_fake: bool = True) -> None:
    """Register the fake implementation and the autograd formula of a sparse kernel op.

    ``register_fake`` is False for ops built with ``torch.library.triton_op``
    that torch.compile traces through.
    """
    if register_fake:
        torch.library.register_fake(qualname)(fake_sparse_kernel)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)
