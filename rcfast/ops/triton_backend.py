"""The ``triton`` backend: the ``rcfast::multihead_kd_fwd_triton`` op.

This module owns the ``torch.library`` op around the Triton kernels of
:mod:`rcfast.kernels.kd_loss`: it is built with ``torch.library.triton_op`` (the
kernels are launched through ``torch.library.wrap_triton``), so on a GPU
``torch.compile`` traces into it and sees the kernel launches and the torch ops
around them. It implements :mod:`rcfast.ops.kernel_contract` (schema, outputs,
scaling); the autograd formula is the contract's, registered here.

Under ``TRITON_INTERPRET=1`` (CPU tensors, the tests) ``@triton.jit`` gives
interpreted functions, which ``wrap_triton`` cannot capture into a graph: it
hands back the raw kernel, which would then run on FakeTensors. There the op is
made opaque to tracing instead (the contract's fake implementation, and no
decomposition under functionalization), so ``torch.compile`` and
``torch.library.opcheck`` keep working and the real op runs the kernels at run
time.
"""
from __future__ import annotations

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

# setup.py installs the top-level kernels/ folder as the package rcfast.kernels
# (package_dir), for an editable install as for a wheel.
from rcfast.kernels import kd_loss
from rcfast.ops.kernel_contract import (
    REDUCTION_CODES, REDUCTION_NAMES, fake_kernel, reduction_scale, register_kernel_op_meta,
)
from rcfast.ops.reference import reduce_row_losses

__all__ = ["multihead_kd_fwd_triton", "kernels_are_interpreted", "QUALNAME"]

QUALNAME = "rcfast::multihead_kd_fwd_triton"

kd_head_losses = kd_loss.kd_head_losses
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.triton_op(QUALNAME, mutates_args=())
def _multihead_kd_fwd_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    head_offsets: torch.Tensor,
    temperatures: torch.Tensor,
    weights: torch.Tensor,
    reduction: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(student.dim() == 2, lambda: "student must be 2-D [B, N]")
    torch._check(teacher.shape == student.shape, lambda: "teacher must match student's shape")
    torch._check(teacher.dtype == student.dtype, lambda: "teacher must have student's dtype")
    torch._check(student.dtype in _TRITON_DTYPES,
                 lambda: f"the triton kernel takes float32, float16 or bfloat16, got {student.dtype}")
    torch._check(head_offsets.dim() == 1 and head_offsets.dtype == torch.int64,
                 lambda: "head_offsets must be int64 [H + 1]")
    if reduction not in REDUCTION_CODES.values():
        raise ValueError(f"reduction must be one of {REDUCTION_CODES}, got {reduction}")
    num_heads = head_offsets.shape[0] - 1
    # The kernels index rows as base + row * N: make the layout that (no copy when
    # it already is, which is what rcfast.multihead_kd_loss passes).
    head_losses, grad = kd_head_losses(
        student.contiguous(), teacher.contiguous(), head_offsets.contiguous(),
        temperatures.to(torch.float32).contiguous(), weights.to(torch.float32).contiguous(),
        reduction_scale(reduction, student.shape[0], num_heads), compute_grad,
    )
    # Per-row losses, then the contract's reduction, with plain torch ops over a
    # [B, H] buffer: deterministic (no atomics), reproducible run to run.
    row_losses = head_losses.sum(dim=1)
    return reduce_row_losses(row_losses, REDUCTION_NAMES[reduction], num_heads), grad


def kernels_are_interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kd_loss._kd_fused_kernel, InterpretedFunction)


def _opaque_under_functionalization(mode, op, types, args, kwargs):
    # Keep the op as one node (do not trace into its body): see the module docstring.
    return mode.__torch_dispatch__(op, types, args, kwargs)


if kernels_are_interpreted():
    _multihead_kd_fwd_triton.register_fake(fake_kernel)
    _multihead_kd_fwd_triton.register_torch_dispatch(FunctionalTensorMode, _opaque_under_functionalization)

register_kernel_op_meta(QUALNAME, register_fake=False)

multihead_kd_fwd_triton = torch.ops.rcfast.multihead_kd_fwd_triton.default
