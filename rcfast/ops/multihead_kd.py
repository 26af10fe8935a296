"""``rcfast.multihead_kd_loss``: argument checking, packing and backend dispatch.

The loss itself lives in the backends (:mod:`rcfast.ops.reference` and the fused
kernels behind :mod:`rcfast.ops.kernel_contract`); this module turns the
user-facing call into the kernels' packed layout and picks the backend.
"""
from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Sequence, Union

import torch

from rcfast.ops.backends import kernel_op, resolve_backend
from rcfast.ops.kernel_contract import REDUCTION_CODES, check_temperature
from rcfast.ops.reference import reduce_row_losses, reference_row_losses

__all__ = ["multihead_kd_loss"]

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_floating(name: str, tensor, dims: int = 2, layout: str = "[batch, classes]",
                   expected: str = "a torch.Tensor") -> None:
    """``tensor`` is a floating tensor of ``dims`` dimensions; else a TypeError/ValueError naming ``name``.

    Shared by the fused KD front ends (dense, top-k teacher, fused linear)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be {expected}, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {tensor.dtype}"
        )
    if tensor.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(tensor.shape)}")


def check_splits(splits, total: int, total_is: str) -> tuple[int, ...]:
    """Head sizes from ``splits`` (``None``: one head of ``total``), checked to sum to ``total``.

    ``total_is`` completes the error "splits [...] sum to S but ...", a template formatted with
    ``total`` only on error (so a symbolic size under ``torch.compile`` is never turned into text).
    """
    if splits is None:
        return (total,)
    if isinstance(splits, (int, torch.Tensor)) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in splits
    ):
        raise TypeError(f"splits must be a sequence of ints, got {splits!r}")
    head_sizes = tuple(splits)
    if len(head_sizes) == 0 or any(c <= 0 for c in head_sizes):
        raise ValueError(f"splits must be a non-empty list of positive class counts, got {splits!r}")
    if sum(head_sizes) != total:
        raise ValueError(f"splits {list(head_sizes)} sum to {sum(head_sizes)} but {total_is.format(total=total)}")
    return head_sizes


def _as_heads(student: Logits, teacher: Logits, splits):
    """Return ``(student_2d, teacher_2d, head_sizes)`` with heads packed along dim 1."""
    if isinstance(student, torch.Tensor) != isinstance(teacher, torch.Tensor):
        raise TypeError("student and teacher must both be tensors or both be lists of tensors")
    if isinstance(student, torch.Tensor):
        check_floating("student", student, expected="a torch.Tensor (or a list of them)")
        check_floating("teacher", teacher, expected="a torch.Tensor (or a list of them)")
        if student.shape != teacher.shape:
            raise ValueError(
                f"student and teacher must have the same shape, got {tuple(student.shape)} "
                f"and {tuple(teacher.shape)}"
            )
        head_sizes = check_splits(splits, student.shape[1], "the logits have {total} columns")
        return student, teacher, head_sizes

    if not isinstance(student, (list, tuple)) or not isinstance(teacher, (list, tuple)):
        raise TypeError("student and teacher must be tensors or lists/tuples of tensors")
    if len(student) == 0 or len(student) != len(teacher):
        raise ValueError(
            f"student and teacher lists must be non-empty and of equal length, got {len(student)} "
            f"and {len(teacher)}"
        )
    for h, (s, t) in enumerate(zip(student, teacher)):
        check_floating(f"student[{h}]", s, expected="a torch.Tensor (or a list of them)")
        check_floating(f"teacher[{h}]", t, expected="a torch.Tensor (or a list of them)")
        if s.shape != t.shape:
            raise ValueError(f"student[{h}] and teacher[{h}] shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
        if s.shape[0] != student[0].shape[0]:
            raise ValueError(f"every head needs the same batch size; head {h} has {s.shape[0]}")
        if s.dtype != student[0].dtype or t.dtype != teacher[0].dtype:
            raise TypeError(f"every head must share one dtype; head {h} differs")
    head_sizes = tuple(s.shape[1] for s in student)
    if splits is not None and tuple(splits) != head_sizes:
        raise ValueError(f"splits {list(splits)} disagree with the heads' sizes {list(head_sizes)}")
    # Lists are packed with one copy each; pass packed tensors + splits to avoid it.
    return torch.cat(list(student), dim=1), torch.cat(list(teacher), dim=1), head_sizes


def _per_head(name: str, value, num_heads: int, default: float) -> tuple[float, ...]:
    """One float per head from a scalar, a sequence or ``None`` (the default)."""
    if value is None:
        return (default,) * num_heads
    if isinstance(value, Real) and not isinstance(value, bool):
        return (float(value),) * num_heads
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a list of floats, not a tensor")
    values = tuple(float(v) for v in value)
    if len(values) != num_heads:
        raise ValueError(f"{name} needs one value per head ({num_heads}), got {len(values)}")
    return values


def _check_weights(values: tuple[float, ...]) -> None:
    # Comparisons rather than math.isfinite: they also work on symbolic floats under
    # torch.compile(dynamic=True) (a guard, not a graph break); NaN fails them.
    for v in values:
        if not (-math.inf < v < math.inf):
            raise ValueError(f"weights must be finite, got {v}")


def _head_offsets(head_sizes: tuple[int, ...]) -> list[int]:
    offsets = [0]
    for c in head_sizes:
        offsets.append(offsets[-1] + c)
    return offsets


def _build_head_tables(head_sizes, temperatures, weights, device):
    # Normal tensors even when the first call runs under torch.inference_mode(): the
    # cached tables are later saved for backward by training calls, which an
    # inference tensor cannot be.
    with torch.inference_mode(False):
        return (
            torch.tensor(_head_offsets(head_sizes), dtype=torch.int64, device=device),
            torch.tensor(temperatures, dtype=torch.float32, device=device),
            torch.tensor(weights, dtype=torch.float32, device=device),
        )


# The kernels' per-head tables (int64 offsets, float32 temperatures and weights),
# built once per (splits, temperatures, weights, device) instead of three
# host-to-device copies per call. A training run uses one or two settings; a few
# entries bound the memory (three tiny tensors each). The kernels only read them.
_cached_head_tables = functools.lru_cache(maxsize=8)(_build_head_tables)


def _head_tables(head_sizes, temperatures, weights, device):
    if torch.compiler.is_compiling():
        # Traced: the tables become graph constants (or, for symbolic floats under
        # dynamic=True, graph inputs); a Python cache has no place in a graph.
        return _build_head_tables(head_sizes, temperatures, weights, device)
    return _cached_head_tables(head_sizes, temperatures, weights, device)


def check_head_options(num_heads: int, temperature, weights, reduction: str, backend) -> tuple[tuple, tuple]:
    """The per-head temperatures and weights of a fused KD call, checked, with its reduction and backend.

    One home for the argument rules every fused KD loss shares (dense, top-k
    teacher, fused linear): a ``ValueError``/``TypeError`` naming the argument.
    """
    temperatures = _per_head("temperature", temperature, num_heads, 4.0)
    for tau in temperatures:
        check_temperature(tau)
    head_weights = _per_head("weights", weights, num_heads, 1.0)
    _check_weights(head_weights)
    if reduction not in REDUCTION_CODES:
        raise ValueError(f"reduction must be one of {sorted(REDUCTION_CODES)}, got {reduction!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return temperatures, head_weights


def multihead_kd_loss(
    student: Logits,
    teacher: Logits,
    splits: Sequence[int] | None = None,
    temperature: float | Sequence[float] = 4.0,
    weights: Sequence[float] | None = None,
    reduction: str = "batchmean",
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head softened-KL distillation loss, fused over all heads.

    ``L_row = sum_h w_h * tau_h**2 * KL(softmax(t_h / tau_h) || softmax(s_h / tau_h))``

    Args:
        student: ``[B, sum(C_h)]`` packed logits with ``splits``, or a list of
            ``H`` tensors ``[B, C_h]``. The only input that receives a gradient.
        teacher: same layout as ``student``; treated as a constant target and
            cast to the student's dtype if it has another.
        splits: head sizes ``[C_1, ..., C_H]`` for packed inputs (default: one head).
        temperature: one float for all heads or one per head, each in the
            supported range ``[1e-6, 100]`` (``MIN_TEMPERATURE``/``MAX_TEMPERATURE``
            of :mod:`rcfast.ops.kernel_contract`; a ``ValueError`` naming
            ``temperature`` otherwise). Below 100 every backend's float32 loss
            stays within the tolerances of docs/kernels.md; above it the loss
            (a KL of order 1/tau**2 from log-sum-exps of order log C) would lose
            accuracy as tau**2 * eps.
        weights: one weight per head (default all 1).
        reduction: ``"batchmean"`` (sum / B, like ``kl_div``), ``"sum"``,
            ``"mean"`` (sum / (B * H)) or ``"none"`` (a ``[B]`` tensor).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``;
            see :func:`rcfast.available_backends`.

    Returns:
        A float32 loss (float64 for float64 inputs); the student's gradient has
        the student's dtype. A teacher logit of ``-inf`` (masked class) adds
        nothing; a student ``-inf`` where the teacher logit is finite gives ``+inf``;
        NaN (or a ``+inf`` logit, which leaves the softmax undefined) in a head
        gives NaN for that head's loss and gradient; nothing else gives NaN.
        The gradient is differentiable: ``torch.autograd.grad(..., create_graph=True)``
        and higher derivatives work on every backend.
    """
    student_2d, teacher_2d, head_sizes = _as_heads(student, teacher, splits)
    num_heads = len(head_sizes)
    if student_2d.shape[0] == 0:
        raise ValueError("student has batch size 0: the loss needs at least one row")
    if student_2d.device != teacher_2d.device:
        raise ValueError(
            f"student and teacher must be on the same device, got {student_2d.device} and {teacher_2d.device}"
        )
    temperatures, head_weights = check_head_options(num_heads, temperature, weights, reduction, backend)

    backend = resolve_backend(backend, student_2d.device)
    # Every backend reads one dtype: a teacher in another precision (e.g. an fp32
    # teacher with a bf16 student under autocast) is cast to the student's, so all
    # backends compute the same function.
    teacher_2d = teacher_2d.detach().to(student_2d.dtype)

    if backend == "reference":
        student_heads = torch.split(student_2d, head_sizes, dim=1)
        teacher_heads = torch.split(teacher_2d, head_sizes, dim=1)
        rows = reference_row_losses(student_heads, teacher_heads, temperatures, head_weights)
        return reduce_row_losses(rows, reduction, num_heads)

    if backend in ("triton", "cuda") and student_2d.dtype == torch.float64:
        raise TypeError(f"backend={backend!r} takes float32, float16 or bfloat16 logits, got float64")
    teacher_2d = teacher_2d.contiguous()
    student_2d = student_2d.contiguous()
    head_offsets, temperatures_t, weights_t = _head_tables(
        head_sizes, temperatures, head_weights, student_2d.device)
    compute_grad = torch.is_grad_enabled() and student_2d.requires_grad
    loss, _grad = kernel_op(backend)(
        student_2d, teacher_2d, head_offsets, temperatures_t, weights_t,
        REDUCTION_CODES[reduction], compute_grad,
    )
    return loss
