"""``rcfast.fused_linear_multihead_kd_loss``: the student's last linear layer fused with the KD loss.

``fused_linear_multihead_kd_loss(hidden, weight, teacher, ...)`` equals
``multihead_kd_loss(hidden @ weight.T + bias, teacher_logits, ...)`` but never
holds the ``[B, N]`` logits (nor their gradient): rows are walked in chunks, the
gradients of ``hidden``, ``weight`` and ``bias`` are computed during the forward
(:mod:`rcfast.ops.fused_linear_chunks`), and the op around that
(:mod:`rcfast.ops.fused_linear_op`) hands them to autograd.

This module owns the user-facing call: argument checks (each error names its
argument), the teacher's forms, autocast, and the choice of backend.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from rcfast.ops.backends import resolve_backend
from rcfast.ops.fused_linear_op import (
    fused_linear_multihead_kd, reference_fused_linear_loss, teacher_logits_of,
)
from rcfast.ops.kernel_contract import REDUCTION_CODES
from rcfast.ops.multihead_kd import _head_tables, check_floating, check_head_options, check_splits

__all__ = ["fused_linear_multihead_kd_loss"]

Teacher = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_linear(prefix: str, hidden, weight, bias) -> None:
    """``{prefix}hidden [B, D]``, ``{prefix}weight [N, D]``, ``{prefix}bias [N]``: shapes and one dtype."""
    check_floating(f"{prefix}hidden", hidden, 2, "[batch, features]")
    check_floating(f"{prefix}weight", weight, 2, "[classes, features]")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{prefix}weight has {weight.shape[1]} features (columns) but {prefix}hidden has "
                         f"{hidden.shape[1]}: {prefix}weight must be [classes, {hidden.shape[1]}]")
    if hidden.shape[1] == 0:
        raise ValueError(f"{prefix}hidden has 0 features")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}weight is {weight.dtype} but {prefix}hidden is {hidden.dtype}: mixing them "
                        "would silently upcast the product; cast one of them (or run under torch.autocast)")
    if bias is not None:
        check_floating(f"{prefix}bias", bias, 1, "[classes]")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}bias has {bias.shape[0]} entries but {prefix}weight has "
                             f"{weight.shape[0]} rows (classes)")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{prefix}bias is {bias.dtype} but {prefix}weight is {weight.dtype}: mixing them "
                            "would silently upcast the logits; cast one of them")
    devices = {t.device for t in (hidden, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{prefix}hidden, {prefix}weight and {prefix}bias must be on one device, "
                         f"got {sorted(map(str, devices))}")


def _teacher_parts(teacher: Teacher, batch: int, num_classes: int, device: torch.device):
    """``(teacher_logits, teacher_hidden, teacher_weight, teacher_bias)``, detached, one form filled."""
    if isinstance(teacher, torch.Tensor):
        check_floating("teacher", teacher, 2, "[batch, classes] logits")
        if teacher.shape != (batch, num_classes):
            raise ValueError(f"teacher logits must be [{batch}, {num_classes}] (hidden's rows, weight's "
                             f"rows), got {tuple(teacher.shape)}")
        if teacher.device != device:
            raise ValueError(f"teacher must be on hidden's device {device}, got {teacher.device}")
        return teacher.detach().contiguous(), None, None, None
    if not isinstance(teacher, (tuple, list)):
        raise TypeError("teacher must be logits [B, N] or a tuple (teacher_hidden, teacher_weight"
                        f"[, teacher_bias]), got {type(teacher).__name__}")
    if len(teacher) not in (2, 3):
        raise ValueError("teacher as a tuple must be (teacher_hidden, teacher_weight) or (teacher_hidden, "
                         f"teacher_weight, teacher_bias), got a tuple of length {len(teacher)}")
    t_hidden, t_weight = teacher[0], teacher[1]
    t_bias = teacher[2] if len(teacher) == 3 else None
    _check_linear("teacher_", t_hidden, t_weight, t_bias)
    if t_hidden.shape[0] != batch:
        raise ValueError(f"teacher_hidden has {t_hidden.shape[0]} rows but hidden has {batch}")
    if t_weight.shape[0] != num_classes:
        raise ValueError(f"teacher_weight has {t_weight.shape[0]} rows (classes) but weight has {num_classes}")
    if t_hidden.device != device:
        raise ValueError(f"teacher_hidden must be on hidden's device {device}, got {t_hidden.device}")
    return None, t_hidden.detach(), t_weight.detach(), None if t_bias is None else t_bias.detach()



def fused_linear_multihead_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: Teacher,
    splits: Sequence[int] | None = None,
    bias: torch.Tensor | None = None,
    temperature: float | Sequence[float] = 4.0,
    weights: Sequence[float] | None = None,
    reduction: str = "batchmean",
    backend: str = "auto",
    *,
    max_chunk_logits: int | None = None,
) -> torch.Tensor:
    """Multi-head softened-KL distillation loss with the student's last linear layer fused in.

    Equals ``rcfast.multihead_kd_loss(hidden @ weight.T + bias, teacher_logits,
    splits, temperature, weights, reduction)`` without ever holding the
    ``[B, sum(C_h)]`` logits: rows are processed in chunks and the gradients of
    ``hidden``, ``weight`` and ``bias`` are computed during the forward.

    Args:
        hidden: ``[B, D]`` features entering the student's last linear layer.
        weight: ``[sum(C_h), D]``, the heads packed along dim 0 (the ``weight``
            of :class:`rcfast.models.MultiHeadStudent`'s ``heads``, or an LM head).
        teacher: the teacher's logits ``[B, sum(C_h)]``, or its last linear
            layer as a tuple ``(teacher_hidden [B, D_t], teacher_weight
            [sum(C_h), D_t][, teacher_bias [sum(C_h)]])``, whose logits are then
            computed chunk by chunk too. A constant target (no gradient).
        splits: head sizes ``[C_1, ..., C_H]`` (default: one head).
        bias: optional ``[sum(C_h)]``.
        temperature, weights, reduction: as in :func:`rcfast.multihead_kd_loss`
            (temperatures in ``[1e-6, 100]``).
        backend: ``"auto"``, ``"reference"`` (the unfused path: the logits are
            materialised), ``"cpu"``, ``"triton"`` or ``"cuda"`` (the fused KD kernel run
            on each chunk).
        max_chunk_logits: the most logits a chunk holds (rows x classes); by
            default at most 1/24 of all the logits (on GPUs about the size of
            ``hidden`` within that; on CPUs at least 128 rows). Heads wider than
            it are split along classes.

    Returns:
        The loss, float32 (float64 for float64 inputs); ``[B]`` for ``"none"``.
        Gradients reach ``hidden``, ``weight`` and ``bias`` in their dtypes.
        ``hidden``, ``weight`` and ``bias`` must share a dtype (under
        ``torch.autocast`` they are cast to the autocast dtype, as a linear
        layer's would be); the teacher's logits are cast to that dtype.
    """
    _check_linear("", hidden, weight, bias)
    batch, num_classes = hidden.shape[0], weight.shape[0]
    if batch == 0:
        raise ValueError("hidden has batch size 0: the loss needs at least one row")
    head_sizes = list(check_splits(splits, num_classes, "weight has {total} rows (classes)"))
    num_heads = len(head_sizes)
    temperatures, head_weights = check_head_options(num_heads, temperature, weights, reduction, backend)
    if max_chunk_logits is not None and (
            not isinstance(max_chunk_logits, int) or isinstance(max_chunk_logits, bool) or max_chunk_logits <= 0):
        raise ValueError(f"max_chunk_logits must be a positive int, got {max_chunk_logits!r}")
    device = hidden.device
    teacher_parts = _teacher_parts(teacher, batch, num_classes, device)

    if torch.is_autocast_enabled(device.type):
        # As a linear layer under autocast: the product runs in the autocast dtype
        # (the casts are recorded by autograd, so fp32 parameters get fp32 gradients).
        dtype = torch.get_autocast_dtype(device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        teacher_parts = tuple(None if t is None else t.to(dtype) for t in teacher_parts)

    backend = resolve_backend(backend, device)
    if backend == "reference":
        teacher_logits = teacher_logits_of(*teacher_parts)
        return reference_fused_linear_loss(hidden, weight, bias, teacher_logits, head_sizes,
                                           temperatures, head_weights, reduction)
    if backend in ("triton", "cuda") and hidden.dtype == torch.float64:
        raise TypeError(f"backend={backend!r} takes float32, float16 or bfloat16 inputs, got float64")

    reduction_code = REDUCTION_CODES[reduction]
    grad_enabled = torch.is_grad_enabled() and reduction != "none"
    compute_grads = [
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    ]
    # The dense op's cached per-head tables: no host-to-device copies per call.
    _, temperatures_t, weights_t = _head_tables(tuple(head_sizes), temperatures, head_weights, device)
    loss, _, _, _ = fused_linear_multihead_kd(
        hidden, weight, bias, *teacher_parts, head_sizes, temperatures_t, weights_t,
        reduction_code, compute_grads, None, max_chunk_logits or 0, backend,
    )
    return loss
