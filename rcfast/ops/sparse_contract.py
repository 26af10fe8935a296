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
in the student's dtype (empty ``[0]`` without ``compute_grad``). Every
non-finite input follows :mod:`rcfast.ops.sparse_reference`, i.e. the dense
op's rules.

Autograd is the shared one of fused losses
(:class:`rcfast.ops.kernel_contract.FusedLossAutograd`): the backward scales
the gradient buffer (handing it over without a copy only when safe), and a
double backward gets the Hessian-vector product of the softened KL. That
product depends on the teacher only through which heads have no teacher
distribution or a NaN, so the dense op's formula serves, given the dense
teacher the entries stand for.
"""
from __future__ import annotations

import torch

from rcfast.ops.kernel_contract import (
    REDUCTION_CODES, FusedLossAutograd, dense_kd_hessian_vector_product, register_fused_loss,
)
from rcfast.ops.sparse_reference import sparse_teacher_to_dense

__all__ = ["SPARSE_OP_SCHEMA", "INDEX_DTYPES", "fake_sparse_kernel", "sparse_kd_hessian_vector_product",
           "register_sparse_op_meta"]

SPARSE_OP_SCHEMA = (
    "(Tensor student, Tensor teacher_values, Tensor teacher_indices, Tensor head_offsets, "
    "Tensor temperatures, Tensor weights, int reduction, bool compute_grad) -> (Tensor, Tensor)"
)

INDEX_DTYPES = (torch.int32, torch.int64)


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
    loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    if reduction == REDUCTION_CODES["none"]:
        loss = student.new_empty((student.shape[0],), dtype=loss_dtype)
    else:
        loss = student.new_empty((), dtype=loss_dtype)
    grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    return loss, grad


def sparse_kd_hessian_vector_product(inputs, vectors):
    """``J_grad^T v`` of the sparse op: the dense op's, with the dense teacher the
    entries stand for (only its masked and NaN heads matter there)."""
    student, teacher_values, teacher_indices, head_offsets, temperatures, weights, reduction, compute_grad = inputs
    if vectors[0] is None:
        return (None,)
    teacher = sparse_teacher_to_dense(teacher_values, teacher_indices, head_offsets, student.shape[1])
    return dense_kd_hessian_vector_product(
        (student, teacher, head_offsets, temperatures, weights, reduction, compute_grad), vectors)


SPARSE_KD_AUTOGRAD = FusedLossAutograd(
    num_inputs=8,
    grad_inputs=(0,),
    hessian_vector_product=sparse_kd_hessian_vector_product,
    rowwise_loss=lambda inputs: inputs[6] == REDUCTION_CODES["none"],
)


def register_sparse_op_meta(qualname: str, *, register_fake: bool = True) -> None:
    """Register the fake implementation and the autograd formula of a sparse kernel op.

    ``register_fake`` is False for ops built with ``torch.library.triton_op``
    that torch.compile traces through.
    """
    register_fused_loss(qualname, SPARSE_KD_AUTOGRAD, fake=fake_sparse_kernel if register_fake else None)
