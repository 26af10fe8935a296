"""The one copy of the fused KD loss tests' tolerances and reference comparisons.

Used by tests/test_kd_loss.py, test_cpu_kernel.py and test_triton_kernel.py, and
meant for every op that implements :mod:`rcfast.ops.kernel_contract` (sparse
top-k, fused linear): make inputs, run a backend forward + backward, compare with
the pure-PyTorch reference.

Two kinds of comparison:

- :func:`assert_matches_reference`: a backend against the reference *in the same
  precision* (float32 math), on ordinary inputs, with the fixed per-dtype
  :data:`TOLERANCES`. This is the backend matrix.
- :func:`assert_matches_float64`: a backend (or the float32 reference itself)
  against the reference run in float64 on the same (rounded) inputs, with
  :func:`error_bounds`, the error model of float32 math. This is for boundary
  sweeps, where fixed tolerances would be either too loose or wrong. The model
  (docs/kernels.md states it as the guarantee):

  - loss, per row: ``LOSS_RTOL * |L| + LOSS_FLOOR * eps32 * sum_h |w_h| tau_h**2 (ln C_h + 1)``.
    The floor is the conditioning of the KL itself: it is a difference of
    log-sum-exps of order ``ln C`` (relative to the max), each known to a few
    float32 ulps, then multiplied by ``tau**2``;
  - gradient, per element: ``rtol(dtype) * |g| + GRAD_FLOOR * eps32 * scale |w_h| tau_h + atol(dtype)``:
    a difference of two probabilities, each to a few float32 ulps, times the
    head's coefficient, then rounded to the student's dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import os

import pytest
import torch

import rcfast
from rcfast.ops.kernel_contract import reduction_scale

__all__ = [
    "DTYPES", "REDUCTIONS", "Tolerance", "TOLERANCES", "FUSED_BACKENDS", "ALL_BACKENDS", "backend_params",
    "device_for", "make_logits", "loss_and_grad", "assert_matches_reference",
    "float64_reference", "error_bounds", "float32_error_bounds", "assert_compiled_matches_eager", "assert_matches_float64", "as_per_head",
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def backend_params(backends):
    """``backends`` as pytest params: ``triton`` marked ``interpreter`` when it runs in
    Triton's interpreter (CPU tensors, TRITON_INTERPRET=1: slow, one program at a time),
    and every backend that runs on CUDA tensors here (``triton`` and ``cuda`` on a GPU
    machine) marked ``gpu``, so ``pytest -m gpu`` runs the whole backend matrix there."""
    interpreted = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"

    def param(backend):
        if backend == "triton" and interpreted:
            return pytest.param(backend, marks=pytest.mark.interpreter)
        if device_for(backend) == "cuda":
            return pytest.param(backend, marks=pytest.mark.gpu)
        return backend
    return [param(b) for b in backends]


FUSED_BACKENDS = [b for b in rcfast.available_backends() if b != "reference"]
ALL_BACKENDS = ["reference"] + FUSED_BACKENDS


class Tolerance(NamedTuple):
    loss_rtol: float
    loss_atol: float
    grad_rtol: float
    grad_atol: float


# Backend vs the float32 reference on ordinary inputs. The loss is float32 math for
# every input dtype, so only accumulation order differs; the gradient is rounded to
# the student's dtype. A gradient element is w*tau*(p_s - p_t): a difference of two
# float32 probabilities scaled by w*tau, hence an absolute floor of ~10 ulp(1),
# multiplied by max(1, |w| tau) in assert_matches_reference.
TOLERANCES = {
    torch.float32: Tolerance(2e-5, 1e-5, 2e-5, 1e-6),
    torch.float16: Tolerance(2e-5, 1e-5, 2e-3, 2e-6),
    torch.bfloat16: Tolerance(2e-5, 1e-5, 1.6e-2, 1e-5),
    torch.float64: Tolerance(1e-10, 1e-12, 1e-10, 1e-14),
}

# The error model of float32 math against the float64 reference (module docstring).
EPS32 = torch.finfo(torch.float32).eps
LOSS_RTOL = 1e-5
LOSS_FLOOR = 2.0
GRAD_FLOOR = 8.0
# Rounding of the gradient to its dtype: half an ulp relative, and the dtype's
# absolute resolution near 0 (fp16 subnormals).
_GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float64: 1e-5}
_GRAD_ATOL = {torch.float32: 0.0, torch.float16: 2.0 ** -24, torch.bfloat16: 0.0, torch.float64: 0.0}


def device_for(backend: str) -> str:
    """Where a backend's inputs live: GPU backends run on CUDA tensors when a GPU exists."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def make_logits(batch, head_sizes, dtype, seed=0, scale=3.0, offset=0.0, ramp=0.0, device="cpu"):
    """Random student and teacher logits ``[batch, sum(head_sizes)]``.

    Drawn in float64 (so every dtype sees the same values before rounding);
    ``ramp`` adds an increasing trend along the columns so a running max moves at
    every tile.
    """
    g = torch.Generator().manual_seed(seed)
    n = sum(head_sizes)
    trend = torch.linspace(0.0, ramp, n, dtype=torch.float64)
    student = torch.randn(batch, n, generator=g, dtype=torch.float64) * scale + offset + trend
    teacher = torch.randn(batch, n, generator=g, dtype=torch.float64) * scale + offset + trend
    return student.to(dtype).to(device), teacher.to(dtype).to(device)


def loss_and_grad(backend, student, teacher, upstream=None, device=None, **kwargs):
    """Forward + backward of ``rcfast.multihead_kd_loss`` on ``backend``: ``(loss, grad)`` on the CPU."""
    device = device or device_for(backend)
    student = student.detach().to(device).clone().requires_grad_(True)
    teacher = teacher.to(device)
    loss = rcfast.multihead_kd_loss(student, teacher, backend=backend, **kwargs)
    if upstream is None:
        upstream = torch.ones_like(loss)
    loss.backward(upstream.to(device))
    return loss.detach().cpu(), student.grad.cpu()


def as_per_head(value, num_heads: int, default: float) -> list[float]:
    if value is None:
        return [default] * num_heads
    if isinstance(value, (int, float)):
        return [float(value)] * num_heads
    return [float(v) for v in value]


def _head_sizes(student, kwargs) -> list[int]:
    return list(kwargs.get("splits") or [student.shape[1]])


def assert_matches_reference(backend, student, teacher, upstream=None, tolerance=None, **kwargs):
    """``backend`` against the float32 reference (the backend matrix).

    Without ``tolerance`` the bound is derived, not fixed: the backend and the
    float32 reference are two float32 computations of the same exact value, each
    within the error model (:func:`float32_error_bounds`) of the float64
    reference, so they agree within twice that model. Being relative to each
    row's loss and each element's gradient, it holds at any magnitude and
    temperature (a fixed absolute tolerance does not: 1e-5 failed on a loss of
    ~1 at tau ~8, where the KL's own conditioning is tau**2 * ln C ulps).
    A ``tolerance`` (a :class:`Tolerance`) compares with fixed tolerances
    instead; float64 inputs always use :data:`TOLERANCES`.
    """
    loss, grad = loss_and_grad(backend, student, teacher, upstream, **kwargs)
    ref_loss, ref_grad = loss_and_grad("reference", student, teacher, upstream, device=device_for(backend), **kwargs)
    assert loss.dtype == ref_loss.dtype
    assert grad.dtype == student.dtype and grad.shape == student.shape
    if tolerance is None and student.dtype != torch.float64:
        loss_bound, grad_bound = float32_error_bounds(student, teacher, upstream, **kwargs)
        keep = ~_unspecified_gradient(student.cpu(), teacher.cpu(), _head_sizes(student, kwargs))
        context = f"backend={backend} vs float32 reference, dtype={student.dtype}, " + ", ".join(
            f"{k}={v}" for k, v in kwargs.items())
        _assert_within("loss", loss, ref_loss, 2 * loss_bound, context)
        _assert_within("grad", torch.where(keep, grad.double(), 0.0), torch.where(keep, ref_grad.double(), 0.0),
                       2 * grad_bound, context)
        return loss, grad
    tol = tolerance or TOLERANCES[student.dtype]
    num_heads = len(_head_sizes(student, kwargs))
    coef = max(abs(w) * t for w, t in zip(as_per_head(kwargs.get("weights"), num_heads, 1.0),
                                          as_per_head(kwargs.get("temperature"), num_heads, 4.0)))
    torch.testing.assert_close(loss, ref_loss, rtol=tol.loss_rtol, atol=tol.loss_atol)
    torch.testing.assert_close(grad, ref_grad, rtol=tol.grad_rtol, atol=tol.grad_atol * max(1.0, coef))
    return loss, grad


def float32_error_bounds(student, teacher, upstream=None, **kwargs):
    """``(loss_bound, grad_bound)``: how far float32 math may be from the exact value.

    The exact value is the reference run in float64 on the same (rounded) inputs;
    the bounds are the error model (module docstring) at those values, for the
    reduction and incoming gradient ``upstream`` of ``kwargs``: per row (or the
    reduced loss), and per gradient element, scaled by ``|upstream|``.
    """
    reduction = kwargs.get("reduction", "batchmean")
    head_sizes = _head_sizes(student, kwargs)
    s64, t64 = student.detach().cpu().double(), teacher.detach().cpu().double()
    up64 = None if upstream is None else upstream.detach().cpu().double()
    rows = rcfast.multihead_kd_loss(s64, t64, backend="reference", **dict(kwargs, reduction="none"))
    _, grad64 = loss_and_grad("reference", s64, t64, up64, device="cpu", **kwargs)
    row_floor, _, grad_rtol = error_bounds(student, teacher, student.dtype, splits=kwargs.get("splits"),
                                           temperature=kwargs.get("temperature", 4.0),
                                           weights=kwargs.get("weights"))
    # Rows whose exact loss is +-inf carry no bound (their equality is checked); keep the sum finite.
    row_bound = torch.where(torch.isfinite(rows), LOSS_RTOL * rows.abs() + row_floor, 0.0)
    scale = reduction_scale(reduction, student.shape[0], len(head_sizes))
    loss_bound = row_bound if reduction == "none" else row_bound.sum() * scale
    # The incoming gradient multiplies each row's gradient (a scalar, or one value per row for "none").
    factor = torch.ones(()) if up64 is None else up64.abs()
    factor = factor.reshape(-1, 1) if factor.dim() == 1 else factor
    grad_bound = (grad_rtol * grad64.abs() + _grad_floor(student, head_sizes, kwargs, reduction) * factor
                  + _GRAD_ATOL[student.dtype])
    return loss_bound, grad_bound


def float64_reference(student, teacher, **kwargs):
    """The reference in float64 on the same (already rounded) inputs: ``(row losses [B], grad)``."""
    kwargs = dict(kwargs, reduction="none")
    return loss_and_grad("reference", student.double(), teacher.double(), device="cpu", **kwargs)


def _column_values(per_head: Sequence[float], head_sizes: Sequence[int]) -> torch.Tensor:
    return torch.cat([torch.full((c,), float(v), dtype=torch.float64) for v, c in zip(per_head, head_sizes)])


def error_bounds(student, teacher, dtype, splits=None, temperature=4.0, weights=None, reduction="none"):
    """``(loss_floor [B] or scalar, grad_atol [B, N], grad_rtol)`` of the float32 error model.

    The loss bound returned is the absolute floor; callers add ``LOSS_RTOL * |L|``.
    """
    head_sizes = list(splits or [student.shape[1]])
    num_heads = len(head_sizes)
    taus = as_per_head(temperature, num_heads, 4.0)
    ws = as_per_head(weights, num_heads, 1.0)
    batch = student.shape[0]
    scale = reduction_scale(reduction, batch, num_heads)
    row_floor = LOSS_FLOOR * EPS32 * sum(abs(w) * t * t * (math.log(c) + 1.0) for w, t, c in zip(ws, taus, head_sizes))
    loss_floor = torch.full((batch,), row_floor, dtype=torch.float64)
    if reduction != "none":
        loss_floor = loss_floor.sum() * scale
    grad_floor = _grad_floor(student, head_sizes, dict(temperature=temperature, weights=weights), reduction)
    grad_atol = (grad_floor + _GRAD_ATOL[dtype]).expand(batch, -1)
    return loss_floor, grad_atol, _GRAD_RTOL[dtype]


def _grad_floor(student, head_sizes, kwargs, reduction) -> torch.Tensor:
    """``GRAD_FLOOR * eps32 * scale |w_h| tau_h`` per column ``[N]``: float32 probabilities to a few ulps."""
    num_heads = len(head_sizes)
    taus = as_per_head(kwargs.get("temperature", 4.0), num_heads, 4.0)
    ws = as_per_head(kwargs.get("weights"), num_heads, 1.0)
    scale = reduction_scale(reduction, student.shape[0], num_heads)
    return GRAD_FLOOR * EPS32 * _column_values([scale * abs(w) * t for w, t in zip(ws, taus)], head_sizes)


def _unspecified_gradient(student, teacher, head_sizes) -> torch.Tensor:
    """Elements whose gradient the contract leaves unspecified: heads whose student is
    -inf everywhere while the teacher has mass (the reference gives 0, kernels -w tau p_t)."""
    mask = torch.zeros(student.shape, dtype=torch.bool)
    begin = 0
    for c in head_sizes:
        s, t = student[:, begin:begin + c], teacher[:, begin:begin + c]
        empty = torch.isneginf(s).all(1) & ~torch.isneginf(t).all(1)
        mask[:, begin:begin + c] = empty.unsqueeze(1)
        begin += c
    return mask


def _assert_within(name, actual, expected, bound, context):
    """|actual - expected| <= bound elementwise; NaN and inf must sit at the same places."""
    actual = actual.double()
    expected = expected.double()
    nan_actual, nan_expected = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_actual, nan_expected), (
        f"{name}: NaN at {nan_actual.nonzero().tolist()[:8]}, expected at {nan_expected.nonzero().tolist()[:8]} ({context})")
    inf_expected = torch.isinf(expected)
    assert torch.equal(actual[inf_expected], expected[inf_expected]), (
        f"{name}: infinities differ: {actual[inf_expected][:8].tolist()} vs {expected[inf_expected][:8].tolist()} "
        f"({context})")
    finite = ~(nan_expected | inf_expected)
    error = (actual - expected).abs()
    bad = finite & ~(error <= bound)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        index = tuple(where)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {int(finite.sum())} values outside the error model; first at {where}: "
            f"got {actual[index].item():.9g}, float64 reference {expected[index].item():.9g}, "
            f"error {error[index].item():.3g} > bound {bound.expand_as(error)[index].item():.3g} ({context})")


def assert_matches_float64(backend, student, teacher, compare_grad=True, **kwargs):
    """``backend`` (float32 math) against the float64 reference within :func:`error_bounds`.

    Runs with ``reduction="none"`` so every row is checked on its own. Returns
    the backend's ``(row losses, grad)``.
    """
    kwargs = dict(kwargs, reduction="none")
    loss, grad = loss_and_grad(backend, student, teacher, **kwargs)
    ref_loss, ref_grad = float64_reference(student, teacher, **kwargs)
    head_sizes = _head_sizes(student, kwargs)
    loss_floor, grad_atol, grad_rtol = error_bounds(
        student, teacher, student.dtype, splits=kwargs.get("splits"), temperature=kwargs.get("temperature", 4.0),
        weights=kwargs.get("weights"))
    context = f"backend={backend}, dtype={student.dtype}, " + ", ".join(f"{k}={v}" for k, v in kwargs.items())
    # The loss is float32: an exact value beyond float32's range is +-inf there.
    ref_loss = ref_loss.float().double()
    _assert_within("loss", loss, ref_loss, LOSS_RTOL * ref_loss.abs() + loss_floor, context)
    assert grad.dtype == student.dtype
    if compare_grad:
        # The reference gradient rounded to the student's dtype is what a perfect
        # kernel returns; the bound allows for float32 math before that rounding.
        keep = ~_unspecified_gradient(student.cpu(), teacher.cpu(), head_sizes)
        bound = grad_rtol * ref_grad.abs() + grad_atol
        _assert_within("grad", torch.where(keep, grad.double(), 0.0), torch.where(keep, ref_grad, 0.0), bound,
                       context)
    return loss, grad


def assert_compiled_matches_eager(step, student, teacher, **compile_kwargs):
    """``torch.compile(step, fullgraph=True, **compile_kwargs)`` gives ``step``'s eager
    loss and student gradient (``step(student, teacher)`` returns a scalar loss)."""
    compiled = torch.compile(step, fullgraph=True, **compile_kwargs)
    s_eager = student.clone().requires_grad_(True)
    s_compiled = student.clone().requires_grad_(True)
    eager_loss = step(s_eager, teacher)
    compiled_loss = compiled(s_compiled, teacher)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(s_compiled.grad, s_eager.grad)
