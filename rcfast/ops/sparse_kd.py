"""``rcfast.sparse_multihead_kd_loss``: the multi-head KD loss against a top-k teacher.

This module owns the user-facing call: argument checks, the optional index
validation, the choice of backend, and the hand-off to the reference
(:mod:`rcfast.ops.sparse_reference`) or to a fused kernel op
(:mod:`rcfast.ops.sparse_contract`). The teacher is given per head as its top-k
logits and their class indices, so no dense ``[B, sum C]`` teacher is ever read
or built: this is what the teacher cache stores.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rcfast.ops.backends import (
    _assume_constant_result, _try_import, _warn_fallback_once, resolve_backend, unavailable_reason,
)
from rcfast.ops.kernel_contract import REDUCTION_CODES
from rcfast.ops.multihead_kd import _head_tables, check_floating, check_head_options, check_splits
from rcfast.ops.reference import reduce_row_losses
from rcfast.ops.sparse_contract import INDEX_DTYPES
from rcfast.ops.sparse_reference import check_sparse_teacher, sparse_reference_row_losses

__all__ = ["sparse_multihead_kd_loss", "sparse_unavailable_reason", "sparse_kernel_op"]

# The module that registers each fused backend's sparse op, and the op's name.
_SPARSE_OPS = {
    "cpu": ("rcfast.ops.sparse_cpu_backend", "sparse_multihead_kd_fwd"),
    "cuda": ("rcfast.ops.sparse_cpu_backend", "sparse_multihead_kd_fwd"),
    "triton": ("rcfast.ops.sparse_triton_backend", "sparse_multihead_kd_fwd_triton"),
}


@_assume_constant_result
def sparse_unavailable_reason(backend: str) -> str | None:
    """``None`` if the sparse op runs on ``backend`` here, else why not.

    A backend of the dense op may lack the sparse op (an ``rcfast._C`` built
    before it existed): that is reported, with what to do.
    """
    reason = unavailable_reason(backend)
    if reason is not None or backend == "reference":
        return reason
    module, reason = _try_import(_SPARSE_OPS[backend][0])
    if module is None:
        return reason
    if backend == "cuda" and not module.sparse_built_with_cuda():
        return "rcfast._C has no CUDA kernel of the sparse op (rebuild with scripts/setup_env.sh)"
    return None


def _resolve_sparse_backend(backend: str, device: torch.device) -> str:
    resolved = resolve_backend(backend, device)
    if resolved == "reference":
        return resolved
    reason = sparse_unavailable_reason(resolved)
    if reason is None:
        return resolved
    if backend == "auto":
        _warn_fallback_once(device.type, f"sparse op, {resolved}: {reason}")
        return "reference"
    raise RuntimeError(f"rcfast: backend={backend!r} has no sparse KD op here: {reason}")


def sparse_kernel_op(backend: str):
    """The ``torch.ops`` overload of a fused backend's sparse op."""
    if backend not in _SPARSE_OPS:
        raise ValueError(f"no sparse kernel op for backend {backend!r}")
    module_name, op_name = _SPARSE_OPS[backend]
    # Importing the module registers the op; under torch.compile it was imported
    # at trace time already (and Dynamo cannot trace importlib).
    if not torch.compiler.is_compiling():
        module, reason = _try_import(module_name)
        if module is None:
            raise RuntimeError(f"rcfast: backend={backend!r} has no sparse KD op here: {reason}")
    return getattr(torch.ops.rcfast, op_name).default



def sparse_multihead_kd_loss(
    student: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    splits: Sequence[int] | None = None,
    temperature: float | Sequence[float] = 4.0,
    weights: Sequence[float] | None = None,
    reduction: str = "batchmean",
    backend: str = "auto",
    validate: bool = False,
) -> torch.Tensor:
    """Multi-head softened-KL distillation loss against a top-k (sparse) teacher.

    ``L_row = sum_h w_h tau_h**2 sum_j p_hj (log p_hj - log softmax(s_h / tau_h)[idx_hj])``
    with ``p_h = softmax(teacher_values[:, h] / tau_h)`` over the head's k entries
    (0 on every other class). With ``k = C_h`` and indices ``0 .. C_h - 1`` this
    is :func:`rcfast.multihead_kd_loss`.

    Args:
        student: ``[B, sum(C_h)]`` packed logits (heads side by side, ``splits``
            gives their sizes). The only input that receives a gradient.
        teacher_values: ``[B, H, k]`` the teacher's logits at ``teacher_indices``
            (e.g. ``torch.topk`` of each head). ``-inf`` marks padding: an entry
            that is not there (its index is not read), so heads with fewer than k
            classes, or rows with fewer entries, pad. Cast to the student's dtype;
            a constant target (detached).
        teacher_indices: ``[B, H, k]`` int32 or int64: each entry's class within
            its head, ``0 <= idx < C_h``, distinct within a (row, head).
        splits: head sizes ``[C_1, ..., C_H]`` (default: one head).
        temperature: one float for all heads or one per head, within the
            dense op's supported range ``[1e-6, 100]`` (``MIN_TEMPERATURE`` /
            ``MAX_TEMPERATURE`` of :mod:`rcfast.ops.kernel_contract`).
        weights: one weight per head (default all 1).
        reduction: ``"batchmean"`` (default), ``"sum"``, ``"mean"`` (sum / (B*H))
            or ``"none"`` (a ``[B]`` tensor).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        validate: check every index (in range, no repeats within a (row, head))
            before computing, with a ``ValueError`` naming the first bad entry;
            one pass over the indices (a host synchronisation on a GPU). The
            ``reference`` backend always checks. Without it, an index out of
            range is still a ``ValueError`` on the CPU kernel and a NaN loss for
            that (row, head) on GPU kernels; repeated indices are not detected.

    Returns:
        A float32 loss (float64 for float64 students); the student's gradient has
        the student's dtype and is differentiable (double backward works). The
        rules for non-finite values are the dense op's: padding adds nothing; a
        student ``-inf`` at a non-padding entry gives ``+inf``; NaN (or ``+inf``)
        in a student head or a teacher value gives NaN for that head; a head of
        weight 0 adds exactly 0.
    """
    check_floating("student", student, 2, "[batch, classes]")
    check_floating("teacher_values", teacher_values, 3, "[batch, heads, k]")
    if not isinstance(teacher_indices, torch.Tensor):
        raise TypeError(f"teacher_indices must be a torch.Tensor, got {type(teacher_indices).__name__}")
    if teacher_indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"teacher_indices must be int32 or int64, got {teacher_indices.dtype}")
    head_sizes = check_splits(splits, student.shape[1], "student has {total} columns")
    num_heads = len(head_sizes)
    batch = student.shape[0]
    if batch == 0:
        raise ValueError("student has batch size 0: the loss needs at least one row")
    if teacher_values.shape[0] != batch or teacher_values.shape[1] != num_heads:
        raise ValueError(
            f"teacher_values must be [B, H, k] = [{batch}, {num_heads}, k] for a student of {batch} rows "
            f"and {num_heads} heads, got {tuple(teacher_values.shape)}")
    if teacher_values.shape[2] == 0:
        raise ValueError("teacher_values has k = 0 entries per head: the teacher needs at least one")
    if teacher_indices.shape != teacher_values.shape:
        raise ValueError(f"teacher_indices must have teacher_values' shape {tuple(teacher_values.shape)}, "
                         f"got {tuple(teacher_indices.shape)}")
    if not (student.device == teacher_values.device == teacher_indices.device):
        raise ValueError(
            f"student, teacher_values and teacher_indices must be on the same device, got {student.device}, "
            f"{teacher_values.device} and {teacher_indices.device}")
    temperatures, head_weights = check_head_options(num_heads, temperature, weights, reduction, backend)
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")

    backend = _resolve_sparse_backend(backend, student.device)
    teacher_values = teacher_values.detach().to(student.dtype)
    teacher_indices = teacher_indices.detach()

    if backend == "reference":
        # The reference checks the indices itself, always.
        rows = sparse_reference_row_losses(student, teacher_values, teacher_indices, head_sizes,
                                           temperatures, head_weights)
        return reduce_row_losses(rows, reduction, num_heads)

    if validate:
        check_sparse_teacher(teacher_values, teacher_indices, head_sizes)
    if backend in ("triton", "cuda") and student.dtype == torch.float64:
        raise TypeError(f"backend={backend!r} takes float32, float16 or bfloat16 logits, got float64")
    head_offsets, temperatures_t, weights_t = _head_tables(head_sizes, temperatures, head_weights, student.device)
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    loss, _grad = sparse_kernel_op(backend)(
        student.contiguous(), teacher_values.contiguous(), teacher_indices.contiguous(), head_offsets,
        temperatures_t, weights_t, REDUCTION_CODES[reduction], compute_grad,
    )
    return loss
