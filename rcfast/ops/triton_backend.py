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

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

import rcfast
from rcfast.ops.kernel_contract import REDUCTION_CODES, fake_kernel, reduction_scale, register_kernel_op_meta
from rcfast.ops.reference import reduce_row_losses

__all__ = ["multihead_kd_fwd_triton", "kernels_are_interpreted", "QUALNAME"]

QUALNAME = "rcfast::multihead_kd_fwd_triton"


def _import_kd_loss():
    """Import ``rcfast.kernels.kd_loss``, also from a source checkout that is not installed.

    ``setup.py`` installs the top-level ``kernels/`` folder as ``rcfast.kernels``
    (``package_dir``); an installed or editable package resolves it. Running from
    a plain checkout (``python -m pytest`` in the repository, nothing installed),
    the same mapping is applied here, to the same folder.
    """
    try:
        return importlib.import_module("rcfast.kernels.kd_loss")
    except ModuleNotFoundError as exc:
        if exc.name not in ("rcfast.kernels", "rcfast.kernels.kd_loss"):
            raise
    kernels_dir = Path(rcfast.__file__).resolve().parent.parent / "kernels"
    init_file = kernels_dir / "__init__.py"
    if not init_file.is_file():
        raise ModuleNotFoundError(
            f"rcfast.kernels is not installed and {kernels_dir} does not exist", name="rcfast.kernels")
    spec = importlib.util.spec_from_file_location(
        "rcfast.kernels", init_file, submodule_search_locations=[str(kernels_dir)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["rcfast.kernels"] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules["rcfast.kernels"]
        raise
    rcfast.kernels = package
    return importlib.import_module("rcfast.kernels.kd_loss")


kd_loss = _import_kd_loss()
kd_head_losses = kd_loss.kd_head_losses

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTION_NAMES = {code: name for name, code in REDUCTION_CODES.items()}


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
    return reduce_row_losses(row_losses, _REDUCTION_NAMES[reduction], num_heads), grad


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
