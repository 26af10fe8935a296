"""The contract every fused kernel backend implements, and its torch.library glue.

Each backend (``cpu`` and ``cuda`` in ``rcfast._C``, ``triton`` in
``rcfast.kernels``) registers one custom op with this schema::

    rcfast::<name>(Tensor student, Tensor teacher, Tensor head_offsets,
                   Tensor temperatures, Tensor weights, int reduction,
                   bool compute_grad) -> (Tensor loss, Tensor grad)

Inputs (prepared by :mod:`rcfast.ops.multihead_kd`):

- ``student``, ``teacher``: ``[B, N]`` contiguous packed logits, same dtype
  (float32, float16, bfloat16; the CPU kernel also takes float64), same device.
- ``head_offsets``: int64 ``[H + 1]``, ``0 = o_0 < o_1 < ... < o_H = N``; head h
  is columns ``o_h .. o_{h+1}-1``. On the inputs' device.
- ``temperatures``, ``weights``: float32 ``[H]`` on the inputs' device.
- ``reduction``: one of :data:`REDUCTION_CODES`.
- ``compute_grad``: whether to run pass 2 and write the gradient.

Outputs:

- ``loss``: float32 (float64 for float64 inputs). ``[B]`` for ``none``, else a
  scalar: the sum of per-row losses times the reduction's scale
  (``sum``: 1, ``batchmean``: 1/B, ``mean``: 1/(B*H)).
- ``grad``: ``d loss / d student`` for an incoming gradient of 1, i.e.
  ``scale * w_h * tau_h * (softmax(s_h/tau_h) - softmax(t_h/tau_h))`` in the
  student's dtype, ``[B, N]``; an empty ``[0]`` tensor when ``compute_grad`` is
  false. For ``none`` the scale is 1 (per row).

Non-finite inputs follow :mod:`rcfast.ops.reference` exactly (masked classes,
fully masked heads, NaN propagation).

The backward formula registered here only multiplies ``grad`` by the incoming
gradient: nothing is recomputed and nothing else is saved.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["REDUCTION_CODES", "OP_SCHEMA", "register_kernel_op_meta"]

REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}

OP_SCHEMA = (
    "(Tensor student, Tensor teacher, Tensor head_offsets, Tensor temperatures, "
    "Tensor weights, int reduction, bool compute_grad) -> (Tensor, Tensor)"
)


def _loss_dtype(student_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if student_dtype == torch.float64 else torch.float32


def fake_kernel(student, teacher, head_offsets, temperatures, weights, reduction, compute_grad):
    """Shape/dtype-only implementation used by torch.compile and opcheck."""
    torch._check(student.dim() == 2, lambda: "student must be 2-D [B, N]")
    torch._check(teacher.shape == student.shape, lambda: "teacher must match student's shape")
    torch._check(head_offsets.dim() == 1, lambda: "head_offsets must be 1-D [H + 1]")
    num_heads = head_offsets.shape[0] - 1
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
    _, grad = output
    ctx.save_for_backward(grad)
    # The second output (the gradient buffer) never receives a gradient; without
    # this, autograd would allocate and zero a [B, N] tensor for it on every
    # backward (as much memory and time as the gradient itself).
    ctx.set_materialize_grads(False)


def _is_plain_eager_cpu(tensor: torch.Tensor) -> bool:
    # The "incoming gradient is exactly 1" shortcut reads a value, which is free
    # on the CPU but a host sync on a GPU, and impossible under tracing
    # (torch.compile, opcheck's fake tensors): only take it in plain CPU eager.
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
    )


def _backward(ctx, grad_loss, _unused_grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:  # only the gradient buffer was used downstream: nothing flows back
        return None, None, None, None, None, None, None
    if grad.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError(
            "rcfast: the KD loss was computed without its gradient (compute_grad=False) "
            "but a backward pass reached it"
        )
    if grad_loss.dim() == 0:
        # loss.backward() on the reduced loss (the common case): the kernel already
        # wrote the final gradient, so hand it over without another pass.
        if _is_plain_eager_cpu(grad_loss) and grad_loss.item() == 1.0:
            return grad, None, None, None, None, None, None
        grad_student = grad * grad_loss.to(grad.dtype)
    else:
        grad_student = grad * grad_loss.to(grad.dtype).unsqueeze(1)
    return grad_student, None, None, None, None, None, None


def register_kernel_op_meta(qualname: str, *, register_fake: bool = True) -> None:
    """Register the fake implementation and the autograd formula of a kernel op.

    ``register_fake`` is False for ops built with ``torch.library.triton_op``,
    which torch.compile traces through directly.
    """
    if register_fake:
        torch.library.register_fake(qualname)(fake_kernel)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)
