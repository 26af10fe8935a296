"""``rcfast.sparse_multihead_kd_loss`` (the KD loss against a top-k teacher) on every backend.

Every fused backend the sparse op has here (``cpu`` when ``rcfast._C`` holds it,
``triton`` under ``TRITON_INTERPRET=1``, ``cuda`` and ``triton`` on CUDA tensors
on a GPU machine) is checked against the pure-PyTorch reference
(:mod:`rcfast.ops.sparse_reference`) on awkward shapes, all dtypes, both index
dtypes, every reduction and the numeric boundaries; the reference itself is
checked against the dense op at k = C. Triton's interpreter is slow: its shapes
stay small.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rcfast
from rcfast.ops.kernel_contract import MAX_TEMPERATURE, MIN_TEMPERATURE, REDUCTION_CODES
from rcfast.ops.sparse_contract import SPARSE_OP_SCHEMA
from rcfast.ops.sparse_kd import sparse_kernel_op, sparse_unavailable_reason
from helpers.kd_compare import (  # tests/ is on sys.path (rootdir conftest.py)
    DTYPES, REDUCTIONS, TOLERANCES, _assert_within, backend_params, device_for, error_bounds,
)

FUSED_NAMES = [b for b in ("cpu", "triton", "cuda") if sparse_unavailable_reason(b) is None]
FUSED = backend_params(FUSED_NAMES)
ALL_BACKENDS = backend_params(["reference"] + FUSED_NAMES)
INTERPRETED = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
INDEX_DTYPES = [torch.int32, torch.int64]
NEG_INF = float("-inf")

needs_fused = pytest.mark.skipif(not FUSED_NAMES, reason="no fused sparse backend here")


def make_sparse(batch, head_sizes, k, dtype=torch.float32, index_dtype=torch.int64, seed=0, scale=3.0,
                pad_index=-1, shuffle=True):
    """Random student logits and the top-k of a random teacher per head.

    Heads with fewer than k classes pad their missing entries (value -inf,
    index ``pad_index``); entries are shuffled so that no kernel can rely on
    topk's order. Returns ``(student, values, indices, dense_teacher)``.
    """
    g = torch.Generator().manual_seed(seed)
    n = sum(head_sizes)
    student = torch.randn(batch, n, generator=g) * scale
    teacher = torch.randn(batch, n, generator=g) * scale
    values = torch.full((batch, len(head_sizes), k), NEG_INF)
    indices = torch.full((batch, len(head_sizes), k), pad_index, dtype=torch.int64)
    first = 0
    for h, size in enumerate(head_sizes):
        top = min(k, size)
        v, i = teacher[:, first:first + size].topk(top, dim=1)
        values[:, h, :top] = v
        indices[:, h, :top] = i
        first += size
    if shuffle:
        order = torch.argsort(torch.rand(batch, len(head_sizes), k, generator=g), dim=2)
        values = values.gather(2, order)
        indices = indices.gather(2, order)
    return student.to(dtype), values.to(dtype), indices.to(index_dtype), teacher.to(dtype)


def loss_and_grad(backend, student, values, indices, upstream=None, device=None, **kwargs):
    device = device or device_for(backend)
    student = student.detach().to(device).clone().requires_grad_(True)
    loss = rcfast.sparse_multihead_kd_loss(student, values.to(device), indices.to(device), backend=backend,
                                           **kwargs)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.to(device))
    return loss.detach().cpu(), student.grad.cpu()


def assert_matches_reference(backend, student, values, indices, upstream=None, **kwargs):
    loss, grad = loss_and_grad(backend, student, values, indices, upstream, **kwargs)
    ref_loss, ref_grad = loss_and_grad("reference", student, values, indices, upstream,
                                       device=device_for(backend), **kwargs)
    loss_rtol, loss_atol, grad_rtol, grad_atol = TOLERANCES[student.dtype]
    assert loss.dtype == ref_loss.dtype
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=loss_atol, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, rtol=grad_rtol, atol=grad_atol, equal_nan=True)
    return loss, grad


def batch_for(backend, num_classes, batch):
    if backend == "triton" and not torch.cuda.is_available() and num_classes > 5000:
        return min(batch, 2)
    return batch


# (head sizes, k): k = 1; k = C; heads of one class; k > C_h (padding); ragged heads; wide heads.
LAYOUTS = [
    ((1,), 1), ((7,), 1), ((7,), 7), ((1000,), 8), ((1, 2, 7, 1000), 8), ((1000, 196, 100, 397), 32),
    ((3, 1, 50), 50), ((33_000,), 32),
]


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "x".join(map(str, l[0])) + f"-k{l[1]}")
@pytest.mark.parametrize("batch", [1, 5])
def test_matches_reference(backend, dtype, layout, batch):
    head_sizes, k = layout
    batch = batch_for(backend, sum(head_sizes), batch)
    student, values, indices, _ = make_sparse(batch, head_sizes, k, dtype, seed=batch)
    assert_matches_reference(backend, student, values, indices, splits=list(head_sizes), temperature=2.0)


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_index_dtypes_agree(backend, index_dtype):
    student, values, indices, _ = make_sparse(4, (30, 5, 90), 6, seed=2)
    loss, grad = assert_matches_reference(backend, student, values, indices.to(index_dtype), splits=[30, 5, 90])
    loss64, grad64 = loss_and_grad(backend, student, values, indices, splits=[30, 5, 90])
    assert torch.equal(loss, loss64) and torch.equal(grad, grad64)


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(backend, dtype, reduction):
    student, values, indices, _ = make_sparse(3, (5, 130, 2), 4, dtype, seed=1)
    loss, _ = assert_matches_reference(backend, student, values, indices, splits=[5, 130, 2], reduction=reduction)
    assert loss.shape == ((3,) if reduction == "none" else ())


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradient_is_applied(backend, reduction):
    student, values, indices, _ = make_sparse(4, (9, 17), 5, seed=2)
    upstream = torch.tensor([0.5, -2.0, 0.0, 3.0]) if reduction == "none" else torch.tensor(-1.7)
    assert_matches_reference(backend, student, values, indices, upstream=upstream, splits=[9, 17],
                             reduction=reduction)


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_temperature_and_weights(backend, dtype):
    student, values, indices, _ = make_sparse(6, (10, 3, 50), 8, dtype, seed=3)
    assert_matches_reference(backend, student, values, indices, splits=[10, 3, 50],
                             temperature=[1.0, 0.5, 7.5], weights=[1.0, 0.0, 2.5])


@pytest.mark.slow
@needs_fused
@pytest.mark.parametrize("backend", FUSED)
def test_exp_cache_and_online_paths(backend):
    """CPU kernel paths: exp cache (many rows) and recompute (few rows); direct sweep
    and tiled online pass (logits far from 0, heads wider than a tile, moving max)."""
    for batch, scale, sizes in [(64, 3.0, (700, 40)), (2, 3.0, (700, 40)), (64, 300.0, (700, 40)),
                                (2, 300.0, (5000, 3)), (48, 1.0, (5000, 3))]:
        batch = batch_for(backend, sum(sizes), batch)
        student, values, indices, _ = make_sparse(batch, sizes, 16, seed=4, scale=scale)
        student = student + torch.linspace(0.0, 60.0, sum(sizes))  # the running max moves along the head
        assert_matches_reference(backend, student, values, indices, splits=list(sizes), temperature=1.5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_equals_dense_op_at_k_equals_c(backend, dtype):
    """With k = C_h and indices 0..C_h-1 (any order) the sparse loss is the dense loss."""
    if dtype == torch.float64 and backend in ("triton", "cuda"):
        pytest.skip("float64 is a reference/cpu dtype")
    sizes = [6, 1, 40]
    student, values, indices, teacher = make_sparse(5, sizes, 40, dtype, seed=5)
    dense_backend = backend if backend in rcfast.available_backends() else "reference"
    kwargs = dict(splits=sizes, temperature=[2.0, 1.0, 3.0], weights=[1.0, 0.5, 2.0], reduction="none")
    device = device_for(backend)
    s_dense = student.to(device).requires_grad_(True)
    dense = rcfast.multihead_kd_loss(s_dense, teacher.to(device), backend=dense_backend, **kwargs)
    dense.sum().backward()
    loss, grad = loss_and_grad(backend, student, values, indices, upstream=torch.ones(5), **kwargs)
    loss_rtol, loss_atol, grad_rtol, grad_atol = TOLERANCES[dtype]
    torch.testing.assert_close(loss, dense.detach().cpu(), rtol=loss_rtol, atol=loss_atol)
    torch.testing.assert_close(grad, s_dense.grad.cpu(), rtol=grad_rtol, atol=grad_atol)


def test_reference_equals_dense_reference_exactly():
    sizes = [5, 3, 7]
    student, values, indices, teacher = make_sparse(4, sizes, 7, seed=6)
    for reduction in REDUCTIONS:
        kwargs = dict(splits=sizes, temperature=[1.0, 2.0, 3.0], reduction=reduction, backend="reference")
        sparse = rcfast.sparse_multihead_kd_loss(student, values, indices, **kwargs)
        dense = rcfast.multihead_kd_loss(student, teacher, **kwargs)
        torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_padding_index_is_never_read(backend):
    """A padding entry's index can be anything (here far out of range)."""
    student, values, indices, _ = make_sparse(3, (4, 9), 6, seed=7, pad_index=-1)
    _, _, garbage, _ = make_sparse(3, (4, 9), 6, seed=7, pad_index=10**9)
    assert (garbage == 10**9).any()
    loss, grad = loss_and_grad(backend, student, values, indices, splits=[4, 9])
    loss2, grad2 = loss_and_grad(backend, student, values, garbage, splits=[4, 9])
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_entry_order_does_not_matter(backend):
    student, values, indices, _ = make_sparse(4, (50,), 10, seed=8, shuffle=False)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    loss, grad = loss_and_grad(backend, student, values, indices)
    loss2, grad2 = loss_and_grad(backend, student, values[:, :, order], indices[:, :, order])
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad2, grad, rtol=1e-5, atol=1e-8)


# ---- -inf, NaN and degenerate heads ----------------------------------------------------------------

@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_entries_and_student_minus_inf(backend, dtype):
    student, values, indices, _ = make_sparse(4, (8, 300), 6, dtype, seed=9)
    values[0, 1, :3] = NEG_INF  # padding in the middle of a row's entries
    student[1, :8] = torch.where(torch.arange(8) == 2, NEG_INF, student[1, :8].float()).to(dtype)
    # row 1: the student is -inf at a class no entry of head 0 names, so nothing changes
    values[1, 0] = torch.where(indices[1, 0] == 2, NEG_INF, values[1, 0].float()).to(dtype)
    # row 2: the student is -inf exactly where a padding entry points
    values[2, 1, 0] = NEG_INF
    student[2, 8 + int(indices[2, 1, 0])] = NEG_INF
    loss, grad = assert_matches_reference(backend, student, values, indices, splits=[8, 300], reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_student_minus_inf_under_teacher_mass_is_inf(backend):
    student, values, indices, _ = make_sparse(3, (12,), 4, seed=10)
    student[1, int(indices[1, 0, 2])] = NEG_INF
    loss, grad = loss_and_grad(backend, student, values, indices, reduction="none")
    assert loss[1] == math.inf and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isfinite(grad).all()
    if backend != "reference":
        ref_loss, ref_grad = loss_and_grad("reference", student, values, indices, reduction="none")
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_of_padding_only_adds_nothing(backend, dtype):
    student, values, indices, _ = make_sparse(3, (6, 40), 5, dtype, seed=11)
    values[0, 0] = NEG_INF  # row 0: head 0 has no teacher distribution
    values[1] = NEG_INF  # row 1: neither head has one
    student[1, 6:9] = NEG_INF
    loss, grad = loss_and_grad(backend, student, values, indices, splits=[6, 40], reduction="none")
    assert loss[1] == 0 and (grad[1] == 0).all() and (grad[0, :6] == 0).all()
    assert torch.isfinite(loss).all()
    if backend != "reference":
        assert_matches_reference(backend, student, values, indices, splits=[6, 40], reduction="none")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_student_head_all_minus_inf_is_inf(backend):
    student, values, indices, _ = make_sparse(2, (5, 9), 3, seed=12)
    student[0, :5] = NEG_INF
    loss, grad = loss_and_grad(backend, student, values, indices, splits=[5, 9], reduction="none")
    assert loss[0] == math.inf and torch.isfinite(loss[1])
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["student_entry", "student_elsewhere", "teacher_value", "padded_head"])
def test_nan_in_nan_out(backend, where):
    student, values, indices, _ = make_sparse(3, (20, 4), 3, seed=13)
    if where == "student_entry":
        student[2, int(indices[2, 0, 1])] = math.nan
    elif where == "student_elsewhere":  # a class no entry names: the softmax still sees it
        others = sorted(set(range(20)) - set(indices[2, 0].tolist()))
        student[2, others[0]] = math.nan
    elif where == "teacher_value":
        values[2, 0, 1] = math.nan
    else:  # a head of padding only adds 0, unless the student brings a NaN
        values[2, 0] = NEG_INF
        student[2, 3] = math.nan
    loss, grad = loss_and_grad(backend, student, values, indices, splits=[20, 4], reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()
    assert torch.isfinite(grad[:2]).all()
    if backend != "reference":
        assert torch.isnan(grad[2, :20]).all() and torch.isfinite(grad[2, 20:]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_one_class_heads_are_exact(backend, dtype):
    """A 1-class head has KL exactly 0 and gradient exactly 0 (issue 8, item 3)."""
    if dtype == torch.float64 and backend in ("triton", "cuda"):
        pytest.skip("float64 is a reference/cpu dtype")
    g = torch.Generator().manual_seed(14)
    student = (torch.randn(6, 3, generator=g) * 30).to(dtype)
    values = (torch.randn(6, 3, 2, generator=g) * 30).to(dtype)
    values[:, :, 1] = NEG_INF  # k = 2 > C_h = 1: one padding entry
    indices = torch.zeros(6, 3, 2, dtype=torch.int64)
    loss, grad = loss_and_grad(backend, student, values, indices, splits=[1, 1, 1], temperature=[1.0, 0.3, 7.0],
                               reduction="none")
    assert (loss == 0).all() and (grad == 0).all()


# ---- numeric boundaries ----------------------------------------------------------------------------

@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4)],
                         ids=["fp32-1e4", "fp16-6e4", "bf16-1e4"])
def test_extreme_logits(backend, dtype, magnitude):
    g = torch.Generator().manual_seed(15)
    signs = torch.randint(0, 2, (4, 64), generator=g).float() * 2 - 1
    student = (signs * magnitude * torch.rand(4, 64, generator=g)).to(dtype)
    teacher = (signs.flip(1) * magnitude * torch.rand(4, 64, generator=g))
    values, indices = torch.stack([teacher[:, :14].topk(5, 1)[0], teacher[:, 14:].topk(5, 1)[0]], 1), \
        torch.stack([teacher[:, :14].topk(5, 1)[1], teacher[:, 14:].topk(5, 1)[1]], 1)
    loss, grad = assert_matches_reference(backend, student, values.to(dtype), indices, splits=[14, 50],
                                          temperature=1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad.float()).all()


def float64_loss_and_grad(student, values, indices, **kwargs):
    return loss_and_grad("reference", student.double(), values.double(), indices, **kwargs)


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("x_over_tau", [80.0, 87.9, 88.3, 88.7, 89.0, 100.0, -87.0, -103.0, -150.0])
def test_exp_boundaries_against_float64(backend, side, x_over_tau):
    """One logit whose logit/tau sits at float32's exp overflow/underflow edges
    (issue 8, item 1: a gradient that lost the softmax mass of such a logit)."""
    for tau in (1.0, 2.5):
        student, values, indices, _ = make_sparse(2, (16,), 4, seed=16, shuffle=False)
        if side == "student":
            student[0, int(indices[0, 0, 0])] = x_over_tau * tau
            student[1, 3] = x_over_tau * tau
        else:
            values[0, 0, 0] = x_over_tau * tau
            values[1, 0, 2] = x_over_tau * tau
        loss, grad = loss_and_grad(backend, student, values, indices, temperature=tau, reduction="none")
        ref_loss, ref_grad = float64_loss_and_grad(student, values, indices, temperature=tau, reduction="none")
        torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=2e-6)


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("magnitude", [1e6, 3e7, 1e9, 1e20, 1e30, 1e37])
def test_huge_logits_against_float64(backend, magnitude):
    """Logits far beyond where exp's argument is exact in float32: the head's
    softmax is then one-hot or nearly so, and must stay right (finite, not NaN)."""
    student, values, indices, _ = make_sparse(3, (9, 5), 3, seed=36, shuffle=False)
    student[0] = student[0] * magnitude  # every logit huge: distinct, ties, signs
    student[1, int(indices[1, 0, 1])] = -magnitude  # a teacher entry the student all but rules out
    values[2, 1] = values[2, 1] * magnitude  # a huge teacher
    for tau in (1.0, 7.0):
        loss, grad = loss_and_grad(backend, student, values, indices, splits=[9, 5], temperature=tau,
                                   reduction="none")
        ref_loss, ref_grad = float64_loss_and_grad(student, values, indices, splits=[9, 5], temperature=tau,
                                                   reduction="none")
        torch.testing.assert_close(loss, ref_loss.float(), rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=1e-6)


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_maxima(backend, dtype):
    """Logits at the dtype's largest finite value, for several temperatures."""
    top = torch.finfo(dtype).max
    student, values, indices, _ = make_sparse(3, (10, 6), 3, dtype, seed=17)
    student[0, 0] = top
    student[1, 0] = -top
    values[1, 0, 0] = top
    values[2, 1, 1] = -top
    for tau in (1.0, 4.0, 100.0):
        loss, grad = loss_and_grad(backend, student, values, indices, splits=[10, 6], temperature=tau,
                                   reduction="none")
        ref_loss, ref_grad = float64_loss_and_grad(student, values, indices, splits=[10, 6], temperature=tau,
                                                   reduction="none")
        # The exact loss can exceed float32's range (tau^2 times a KL near the maximum): then inf is right.
        torch.testing.assert_close(loss, ref_loss.float(), rtol=2e-5, atol=1e-4 * max(1.0, tau * tau))
        torch.testing.assert_close(grad.double(), ref_grad, rtol=TOLERANCES[dtype][2],
                                   atol=1e-5 + TOLERANCES[dtype][2] * tau / 3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tau", [MIN_TEMPERATURE, 1e-3, 0.05, 1.0, 30.0, MAX_TEMPERATURE])
def test_temperature_range(backend, tau):
    """The whole supported range of temperatures (the dense op's), against the
    float64 reference within the float32 error model of tests/helpers/kd_compare.py."""
    student, values, indices, _ = make_sparse(4, (30, 7), 5, seed=18)
    values[1, 1, 3] = values[1, 1, 0] - 400.0  # an entry whose p underflows at small tau
    kwargs = dict(splits=[30, 7], temperature=tau, weights=[1.0, 0.5], reduction="none")
    loss, grad = loss_and_grad(backend, student, values, indices, **kwargs)
    ref_loss, ref_grad = float64_loss_and_grad(student, values, indices, **kwargs)
    loss_floor, grad_atol, grad_rtol = error_bounds(student, None, student.dtype, splits=[30, 7], temperature=tau,
                                                    weights=[1.0, 0.5])
    context = f"backend={backend}, tau={tau}"
    _assert_within("loss", loss, ref_loss, 1e-5 * ref_loss.abs() + loss_floor, context)
    _assert_within("grad", grad, ref_grad, grad_rtol * ref_grad.abs() + grad_atol, context)


@pytest.mark.parametrize("tau", [0.0, -1.0, 1e-9, MIN_TEMPERATURE / 2, MAX_TEMPERATURE * 2, math.inf, math.nan])
def test_temperature_outside_the_supported_range_is_refused(tau):
    student, values, indices, _ = make_sparse(2, (5,), 2, seed=19)
    with pytest.raises(ValueError, match="temperature"):
        rcfast.sparse_multihead_kd_loss(student, values, indices, temperature=tau)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weight_zero_head_adds_exactly_zero(backend):
    """As the dense op: a head of weight 0 adds 0 even where its KL is +inf (0 * inf
    would be NaN), and no gradient; a NaN still propagates."""
    student, values, indices, _ = make_sparse(3, (6, 9), 3, seed=37)
    student[0, int(indices[0, 0, 1])] = NEG_INF  # KL +inf in head 0, row 0
    student[2, 6 + int(indices[2, 1, 0])] = math.nan  # NaN in head 1, row 2
    loss, grad = loss_and_grad(backend, student, values, indices, splits=[6, 9], weights=[0.0, 0.0],
                               reduction="none")
    assert loss[0] == 0 and loss[1] == 0 and torch.isnan(loss[2])
    assert (grad[:2] == 0).all() and (grad[2, :6] == 0).all() and torch.isnan(grad[2, 6:]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_student_minus_inf_under_a_finite_value_is_inf_even_if_p_underflows(backend):
    """+inf is decided on the logits, not on whether a float32 exp of the teacher
    underflowed (the dense op's rule)."""
    student, values, indices, _ = make_sparse(2, (20,), 4, seed=38, shuffle=False)
    values[0, 0, 3] = values[0, 0, 0] - 1e4  # p = exp(-1e4 / tau) = 0 in float32
    student[0, int(indices[0, 0, 3])] = NEG_INF
    loss, grad = loss_and_grad(backend, student, values, indices, reduction="none")
    assert loss[0] == math.inf and torch.isfinite(loss[1])
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_plus_inf_logits_give_nan(backend, where):
    """A +inf logit leaves the softmax undefined: NaN for that (row, head), as the dense op."""
    student, values, indices, _ = make_sparse(2, (7, 5), 3, seed=39)
    if where == "student":
        student[1, 2] = math.inf
    else:
        values[1, 0, 1] = math.inf
    loss, grad = loss_and_grad(backend, student, values, indices, splits=[7, 5], reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0])
    assert torch.isnan(grad[1, :7]).all() and torch.isfinite(grad[1, 7:]).all() and torch.isfinite(grad[0]).all()


# ---- autograd ----------------------------------------------------------------------------------------

GRADCHECK_BACKENDS = [b for b in ["reference"] + FUSED_NAMES if b in ("reference", "cpu")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck_float64(backend, reduction):
    student, values, indices, _ = make_sparse(2, (3, 5), 3, torch.float64, seed=20, scale=1.0)
    values[0, 1, 2] = NEG_INF  # a padding entry
    student.requires_grad_(True)

    def fn(s):
        return rcfast.sparse_multihead_kd_loss(s, values, indices, splits=[3, 5], temperature=[2.0, 0.7],
                                               weights=[1.0, 0.3], reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_double_backward_matches_reference(backend, reduction):
    """A gradient penalty (second order) through the op equals the reference's."""
    student, values, indices, _ = make_sparse(4, (9, 30), 5, seed=21)
    values[1, 0, :] = NEG_INF  # a head of padding only: no curvature there
    probe = torch.randn(4, 39, generator=torch.Generator().manual_seed(2))

    def penalty_grad(which, device):
        s = student.to(device).requires_grad_(True)
        loss = rcfast.sparse_multihead_kd_loss(s, values.to(device), indices.to(device), splits=[9, 30],
                                               temperature=[2.0, 1.5], weights=[1.0, 3.0], reduction=reduction,
                                               backend=which)
        (g,) = torch.autograd.grad(loss.sum(), s, create_graph=True)
        (gg,) = torch.autograd.grad((g * probe.to(device)).sum() + (g * g).sum(), s)
        return g.detach().cpu(), gg.cpu()

    g, gg = penalty_grad(backend, device_for(backend))
    ref_g, ref_gg = penalty_grad("reference", device_for(backend))
    torch.testing.assert_close(g, ref_g, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gg, ref_gg, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_repeated_backward_with_retain_graph(backend):
    """Three backward passes through one graph accumulate three times the gradient
    (issue 8, item 5: the zero-copy hand-over must not alias a buffer autograd adds into)."""
    student, values, indices, _ = make_sparse(3, (7, 11), 4, seed=22)
    device = device_for(backend)
    s = student.to(device).requires_grad_(True)
    loss = rcfast.sparse_multihead_kd_loss(s, values.to(device), indices.to(device), splits=[7, 11],
                                           backend=backend)
    _, once = loss_and_grad(backend, student, values, indices, splits=[7, 11])
    for repeat in (1, 2, 3):
        loss.backward(retain_graph=repeat < 3)
        torch.testing.assert_close(s.grad.cpu(), once * repeat, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_accumulates_over_steps(backend):
    student, values, indices, _ = make_sparse(3, (7,), 3, seed=23)
    device = device_for(backend)
    s = student.to(device).requires_grad_(True)
    for _ in range(2):
        rcfast.sparse_multihead_kd_loss(s, values.to(device), indices.to(device), backend=backend).backward()
    _, once = loss_and_grad(backend, student, values, indices)
    torch.testing.assert_close(s.grad.cpu(), 2 * once, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_flows_to_student_only(backend):
    student, values, indices, _ = make_sparse(2, (5,), 2, seed=24)
    device = device_for(backend)
    s = student.to(device).requires_grad_(True)
    v = values.to(device).requires_grad_(True)
    rcfast.sparse_multihead_kd_loss(s, v, indices.to(device), backend=backend).backward()
    assert s.grad is not None and v.grad is None


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_grad_forward_matches(backend):
    student, values, indices, _ = make_sparse(3, (4, 40), 6, seed=25)
    device = device_for(backend)
    with torch.no_grad():
        loss = rcfast.sparse_multihead_kd_loss(student.to(device), values.to(device), indices.to(device),
                                               splits=[4, 40], backend=backend)
    ref = rcfast.sparse_multihead_kd_loss(student, values, indices, splits=[4, 40], backend="reference")
    torch.testing.assert_close(loss.cpu(), ref, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_teacher_values_in_another_dtype(backend):
    student, values, indices, _ = make_sparse(3, (25,), 4, seed=26)
    student = student.to(torch.bfloat16)
    loss, grad = loss_and_grad(backend, student, values, indices)
    ref_loss, ref_grad = loss_and_grad("reference", student, values.to(torch.bfloat16), indices)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, ref_grad, rtol=1.6e-2, atol=1e-4)


def non_contiguous(tensor):
    """The same values with every other element of storage skipped."""
    return torch.stack([tensor, torch.zeros_like(tensor)], dim=-1)[..., 0]


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_inputs(backend):
    student, values, indices, _ = make_sparse(7, (20, 30), 6, seed=27)
    student, values, indices = non_contiguous(student), non_contiguous(values), non_contiguous(indices)
    assert not student.is_contiguous() and not values.is_contiguous() and not indices.is_contiguous()
    assert_matches_reference(backend, student, values, indices, splits=[20, 30])


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
def test_repeated_indices_without_validation_give_the_gradient_of_the_loss(backend):
    """Kernels do not look for repeated indices, but still compute one consistent
    function: the stated loss with the repeats as separate entries, whose gradient
    scatter-adds their mass (written out here in float64)."""
    student, values, indices, _ = make_sparse(4, (12, 30), 6, seed=28)
    indices[0, 0, 1] = indices[0, 0, 0]
    indices[2, 1, 2:5] = indices[2, 1, 5]
    tau = 2.0
    s64 = student.double().requires_grad_(True)
    stated = 0.0
    for h, s_h in enumerate(s64.split([12, 30], dim=1)):
        log_q = torch.log_softmax(s_h / tau, dim=1).gather(1, indices[:, h])
        log_p = torch.log_softmax(values[:, h].double() / tau, dim=1)
        stated = stated + tau**2 * (log_p.exp() * (log_p - log_q)).sum() / 4
    stated.backward()
    loss, grad = loss_and_grad(backend, student, values, indices, splits=[12, 30], temperature=tau)
    torch.testing.assert_close(loss.double(), stated.detach(), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=2e-5, atol=1e-6)


def test_thread_count_does_not_change_cpu_results():
    if "cpu" not in FUSED_NAMES:
        pytest.skip("cpu sparse op not built")
    student, values, indices, _ = make_sparse(64, (300, 41), 16, seed=29)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(loss_and_grad("cpu", student, values, indices, splits=[300, 41]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.slow
@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    head_sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    k=st.integers(1, 40),
    batch=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    index_dtype=st.sampled_from(INDEX_DTYPES),
    temperature=st.floats(0.25, 8.0),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(backend, head_sizes, k, batch, dtype, index_dtype, temperature, reduction, seed):
    student, values, indices, _ = make_sparse(batch, head_sizes, k, dtype, index_dtype, seed=seed)
    assert_matches_reference(backend, student, values, indices, splits=head_sizes, temperature=temperature,
                             reduction=reduction)


# ---- custom-op registration: opcheck, torch.compile ---------------------------------------------

def test_schema_in_bindings_matches_contract():
    if "cpu" not in FUSED_NAMES:
        pytest.skip("cpu sparse op not built")
    schema = str(torch.ops.rcfast.sparse_multihead_kd_fwd.default._schema)
    assert schema == "rcfast::sparse_multihead_kd_fwd" + SPARSE_OP_SCHEMA


@pytest.mark.slow
@needs_fused
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_opcheck(backend, reduction, requires_grad, index_dtype):
    device = device_for(backend)
    student, values, indices, _ = make_sparse(3, (5, 9), 3, index_dtype=index_dtype, seed=30)
    student = student.to(device).requires_grad_(requires_grad)
    args = (student, values.to(device), indices.to(device), torch.tensor([0, 5, 14], device=device),
            torch.tensor([2.0, 3.0], device=device), torch.tensor([1.0, 0.5], device=device),
            REDUCTION_CODES[reduction], requires_grad)
    torch.library.opcheck(sparse_kernel_op(backend), args)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_compile_fullgraph_dynamic(backend):
    """No graph break (fullgraph), dynamic shapes, and the same loss and gradient as eager."""
    device = device_for(backend)

    def step(s, v, i, tau):
        return rcfast.sparse_multihead_kd_loss(s, v, i, splits=[7, 30], temperature=[tau, 4.0],
                                               backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for batch in (5, 8):
        student, values, indices, _ = make_sparse(batch, (7, 30), 4, seed=31 + batch)
        student, values, indices = student.to(device), values.to(device), indices.to(device)
        s1 = student.clone().requires_grad_(True)
        s2 = student.clone().requires_grad_(True)
        eager_loss = step(s1, values, indices, 2.0)
        compiled_loss = compiled(s2, values, indices, 2.0)
        eager_loss.backward()
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss)
        torch.testing.assert_close(s2.grad, s1.grad)


# ---- bad calls -----------------------------------------------------------------------------------

def _good(**overrides):
    student, values, indices, _ = make_sparse(2, (5, 3), 3, seed=32)
    kwargs = dict(student=student, teacher_values=values, teacher_indices=indices, splits=[5, 3])
    kwargs.update(overrides)
    return kwargs


def _with_index(row, head, entry, value):
    kwargs = _good()
    kwargs["teacher_indices"] = kwargs["teacher_indices"].clone()
    kwargs["teacher_indices"][row, head, entry] = value
    return kwargs


BAD_CALLS = [
    (dict(teacher_indices=torch.zeros(2, 2, 3, dtype=torch.int16)), TypeError, "teacher_indices"),
    (dict(teacher_indices=torch.zeros(2, 2, 3)), TypeError, "teacher_indices"),
    (dict(teacher_indices=[[0]]), TypeError, "teacher_indices"),
    (dict(teacher_indices=torch.zeros(2, 2, 4, dtype=torch.int64)), ValueError, "teacher_indices"),
    (dict(teacher_values=torch.zeros(2, 3, 3)), ValueError, "teacher_values"),
    (dict(teacher_values=torch.zeros(3, 2, 3)), ValueError, "teacher_values"),
    (dict(teacher_values=torch.zeros(2, 6)), ValueError, "teacher_values"),
    (dict(teacher_values=torch.zeros(2, 2, 3, dtype=torch.int64)), TypeError, "teacher_values"),
    (dict(teacher_values=torch.zeros(2, 2, 0), teacher_indices=torch.zeros(2, 2, 0, dtype=torch.int64)),
     ValueError, "k = 0"),
    (dict(student=torch.zeros(2, 9)), ValueError, "splits"),
    (dict(student=torch.zeros(2, 8, 1)), ValueError, "student"),
    (dict(student=torch.zeros(2, 8, dtype=torch.int64)), TypeError, "student"),
    (dict(student=torch.zeros(0, 8), teacher_values=torch.zeros(0, 2, 3),
          teacher_indices=torch.zeros(0, 2, 3, dtype=torch.int64)), ValueError, "batch size 0"),
    (dict(splits=[5, 2, 1]), ValueError, "teacher_values"),
    (dict(splits=8), TypeError, "splits"),
    (dict(temperature=[1.0]), ValueError, "temperature"),
    (dict(temperature=-2.0), ValueError, "temperature"),
    (dict(weights=[1.0, 2.0, 3.0]), ValueError, "weights"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(validate="yes"), TypeError, "validate"),
]


@pytest.mark.parametrize("overrides,error,match", BAD_CALLS, ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_calls_raise(overrides, error, match, backend):
    kwargs = _good(**overrides)
    kwargs.setdefault("backend", backend)
    with pytest.raises(error, match=match):
        rcfast.sparse_multihead_kd_loss(**kwargs)


def _checked_backends():
    """Where a bad index is a ValueError: the reference always, every backend with validate=True."""
    yield "reference", False
    for backend in FUSED_NAMES:
        marks = [pytest.mark.interpreter] if backend == "triton" and INTERPRETED else []
        yield pytest.param(backend, True, marks=marks)


@pytest.mark.parametrize("backend,validate", list(_checked_backends()))
@pytest.mark.parametrize("case,match", [
    ((0, 0, 1, 5), r"teacher_indices\[0, 0, 1\] = 5 is out of range: head 0 has 5 classes"),
    ((1, 1, 2, -1), r"teacher_indices\[1, 1, 2\] = -1 is out of range"),
    ((1, 1, 0, 10**6), r"out of range"),
], ids=["past-end", "negative", "huge"])
def test_index_out_of_range_is_a_value_error(backend, validate, case, match):
    kwargs = _with_index(*case)
    device = device_for(backend)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        rcfast.sparse_multihead_kd_loss(**kwargs, backend=backend, validate=validate)


@pytest.mark.skipif("cpu" not in FUSED_NAMES, reason="cpu sparse op not built")
@pytest.mark.parametrize("requires_grad", [True, False])
def test_cpu_kernel_refuses_out_of_range_indices_without_validate(requires_grad):
    kwargs = _with_index(1, 0, 2, 7)
    kwargs["student"].requires_grad_(requires_grad)
    with pytest.raises(ValueError, match=r"teacher_indices\[1, 0, 2\] = 7 is out of range: head 0 has 5"):
        rcfast.sparse_multihead_kd_loss(**kwargs, backend="cpu")


@pytest.mark.parametrize("backend", backend_params([b for b in FUSED_NAMES if b in ("triton", "cuda")]))
def test_gpu_kernels_turn_out_of_range_indices_into_nan(backend):
    """GPU kernels cannot raise without a host sync: the (row, head) becomes NaN,
    and nothing outside the tensors is read or written."""
    device = device_for(backend)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in _with_index(1, 0, 2, 7).items()}
    student = kwargs.pop("student").requires_grad_(True)
    loss = rcfast.sparse_multihead_kd_loss(student, **kwargs, backend=backend, reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0])
    assert torch.isnan(student.grad[1, :5]).all() and torch.isfinite(student.grad[1, 5:]).all()
    assert torch.isfinite(student.grad[0]).all()


@pytest.mark.parametrize("backend,validate", list(_checked_backends()))
def test_repeated_index_is_a_value_error(backend, validate):
    kwargs = _with_index(1, 0, 2, 0)
    kwargs["teacher_indices"][1, 0, 0] = 0
    with pytest.raises(ValueError, match="class 0 appears more than once in row 1, head 0"):
        rcfast.sparse_multihead_kd_loss(**{k: (v.to(device_for(backend)) if isinstance(v, torch.Tensor) else v)
                                           for k, v in kwargs.items()}, backend=backend, validate=validate)


@pytest.mark.parametrize("backend,validate", list(_checked_backends()))
def test_more_entries_than_classes_is_a_value_error(backend, validate):
    """k > C_h is fine with padding; more real entries than the head has classes is not."""
    student, values, indices, _ = make_sparse(2, (2, 6), 3, seed=33)  # head 0: 2 classes, 1 padding entry
    device = device_for(backend)
    rcfast.sparse_multihead_kd_loss(student.to(device), values.to(device), indices.to(device), splits=[2, 6],
                                    backend=backend, validate=validate)
    values[0, 0, :] = 1.0
    indices[0, 0, :] = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="3 non-padding entries but the head has only 2 classes"):
        rcfast.sparse_multihead_kd_loss(student.to(device), values.to(device), indices.to(device), splits=[2, 6],
                                        backend=backend, validate=validate)


def test_devices_must_match():
    kwargs = _good()
    kwargs["teacher_values"] = torch.empty(2, 2, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        rcfast.sparse_multihead_kd_loss(**kwargs, backend="reference")


# ---- the CUDA kernel (run by scripts/gpu_check.sh on a GPU machine) ------------------------------

@pytest.mark.gpu
def test_cuda_backend_is_built_and_matches_reference():
    """On a GPU machine the CUDA kernel must exist (a silent skip would hide a broken build)."""
    assert "cuda" in FUSED_NAMES, sparse_unavailable_reason("cuda")
    for (sizes, k), dtype in zip(LAYOUTS, DTYPES * 3):
        student, values, indices, _ = make_sparse(9, sizes, k, dtype, seed=34)
        assert_matches_reference("cuda", student, values, indices, splits=list(sizes), temperature=2.0)


@pytest.mark.gpu
def test_triton_on_cuda_matches_reference_on_wide_heads():
    assert "triton" in FUSED_NAMES, sparse_unavailable_reason("triton")
    student, values, indices, _ = make_sparse(64, (128_000, 1000), 64, torch.bfloat16, seed=35)
    assert_matches_reference("triton", student, values, indices, splits=[128_000, 1000])
