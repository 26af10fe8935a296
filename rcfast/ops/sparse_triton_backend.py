"""The ``triton`` backend of the sparse op: ``rcfast::sparse_multihead_kd_fwd_triton``.

The ``torch.library.triton_op`` around :func:`rcfast.kernels.sparse_kd_loss.sparse_kd_head_losses`,
built like the dense op of :mod:`rcfast.ops.triton_backend`: on a GPU
``torch.compile`` traces into it; under ``TRITON_INTERPRET=1`` it is opaque to
tracing (fake implementation, no decomposition under functionalization). The
contract and autograd formula are :mod:`rcfast.ops.sparse_contract`'s.
"""
from __future__ import annotations

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from rcfast.kernels import sparse_kd_loss
from rcfast.ops import triton_backend
from rcfast.ops.kernel_contract import REDUCTION_CODES, REDUCTION_NAMES, reduction_scale
from rcfast.ops.reference import reduce_row_losses
from rcfast.ops.sparse_contract import INDEX_DTYPES, fake_sparse_kernel, register_sparse_op_meta

__all__ = ["sparse_multihead_kd_fwd_triton", "QUALNAME"]

QUALNAME = "rcfast::sparse_multihead_kd_fwd_triton"


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.triton_op(QUALNAME, mutates_args=())
def _sparse_multihead_kd_fwd_triton(
    student: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    head_offsets: torch.Tensor,
    temperatures: torch.Tensor,
    weights: torch.Tensor,
    reduction: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(student.dim() == 2, lambda: "student must be 2-D [B, N]")
    torch._check(student.dtype in _TRITON_DTYPES,
                 lambda: f"the triton kernel takes float32, float16 or bfloat16, got {student.dtype}")
    torch._check(teacher_values.dim() == 3 and teacher_values.shape[0] == student.shape[0],
                 lambda: "teacher_values must be [B, H, k]")
    torch._check(teacher_values.dtype == student.dtype, lambda: "teacher_values must have student's dtype")
    torch._check(teacher_indices.shape == teacher_values.shape and teacher_indices.dtype in INDEX_DTYPES,
                 lambda: "teacher_indices must be int32 or int64 of teacher_values' shape")
    torch._check(head_offsets.dim() == 1 and head_offsets.dtype == torch.int64,
                 lambda: "head_offsets must be int64 [H + 1]")
    torch._check(teacher_values.shape[1] == head_offsets.shape[0] - 1,
                 lambda: "teacher_values needs one slice per head")
    if reduction not in REDUCTION_CODES.values():
        raise ValueError(f"reduction must be one of {REDUCTION_CODES}, got {reduction}")
    num_heads = head_offsets.shape[0] - 1
    head_losses, grad = sparse_kd_loss.sparse_kd_head_losses(
        student.contiguous(), teacher_values.contiguous(), teacher_indices.contiguous(),
        head_offsets.contiguous(), temperatures.to(torch.float32).contiguous(),
        weights.to(torch.float32).contiguous(), reduction_scale(reduction, student.shape[0], num_heads),
        compute_grad,
    )
    # The contract's reduction over per-row sums: deterministic (no atomics).
    return reduce_row_losses(head_losses.sum(dim=1), REDUCTION_NAMES[reduction], num_heads), grad


def _opaque_under_functionalization(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


if triton_backend.kernels_are_interpreted():
    _sparse_multihead_kd_fwd_triton.register_fake(fake_sparse_kernel)
    _sparse_multihead_kd_fwd_triton.register_torch_dispatch(FunctionalTensorMode, _opaque_under_functionalization)

register_sparse_op_meta(QUALNAME, register_fake=False)

sparse_multihead_kd_fwd_triton = torch.ops.rcfast.sparse_multihead_kd_fwd_triton.default
