"""Numeric boundaries of every backend of ``rcfast.multihead_kd_loss`` against float64.

Each backend computes in float32 (the reference backend too, for float32/16 and
bfloat16 inputs); here every result is compared with the reference run in
float64 on the same rounded inputs, within the float32 error model of
:func:`helpers.kd_compare.error_bounds` (documented in docs/kernels.md). The
sweeps walk every boundary the kernels have: exp overflow and underflow relative
to 0 (the CPU kernel's direct pass) and to the running max, on the student side
and the teacher side, one large logit and many; denormal exps and denormal
logits; the fp16/bf16/fp32 maxima divided by small temperatures; the ends of the
supported temperature range; -inf, +inf and NaN; 1-class and very wide heads.
A hypothesis fuzz then draws all of these at once, for the loss and the gradient.

On a GPU machine the triton and cuda parameters of every sweep run on CUDA
tensors and are marked ``gpu`` (:func:`helpers.kd_compare.backend_params`), and a
larger fuzz runs there too.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rcfast
from helpers.kd_compare import (
    ALL_BACKENDS, assert_matches_float64, backend_params, device_for, loss_and_grad, make_logits,
)
from rcfast.ops.kernel_contract import MAX_TEMPERATURE, MIN_TEMPERATURE

GPU_BACKENDS = [b for b in ("triton", "cuda") if b in rcfast.available_backends() and torch.cuda.is_available()]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LN2 = math.log(2.0)
# float32's exp overflows above 88.72; the CPU kernel's exp is base 2 and its
# direct pass works relative to 0, so its boundaries sit at these x = logit / tau.
EXP_BOUNDARIES = [80.0, 87.9, 88.0, 88.5, 88.72, 88.8, 89.0, 100.0, 126 * LN2, 128 * LN2, 150.0, 1e3, 1e5]


def _sweep_backends():
    return backend_params(ALL_BACKENDS)


def _small(backend, batch):
    # Triton's interpreter runs one program at a time: keep its sweeps to few rows.
    return min(batch, 2) if backend == "triton" and not torch.cuda.is_available() else batch


# ---- exp overflow / underflow, student and teacher side ----------------------------------------------

@pytest.mark.parametrize("backend", _sweep_backends())
@pytest.mark.parametrize("side", ["student", "teacher", "both"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["large", "very_negative"])
@pytest.mark.parametrize("temperature", [1.0, 0.25, 4.0])
def test_one_logit_at_exp_boundaries(backend, side, sign, temperature):
    """Issue 8 item 1: a student logit with s/tau in [87.9, 88.72] lost its softmax
    mass in the CPU gradient. One logit per row at each boundary, the others ordinary."""
    batch = len(EXP_BOUNDARIES)
    student, teacher = make_logits(batch, (16,), torch.float32, seed=1)
    for row, x in enumerate(EXP_BOUNDARIES):
        if side in ("student", "both"):
            student[row, row % 16] = sign * x * temperature
        if side in ("teacher", "both"):
            teacher[row, (row + 3) % 16] = sign * x * temperature
    assert_matches_float64(backend, student, teacher, temperature=temperature)


def test_issue_repro_gradient_near_exp_overflow():
    """The exact repro of issue 8 item 1 on every backend: grad[0, 0] was -0.041
    (reference 0.959) on cpu."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, 16, generator=g)
    student[0, 0] = 88.0
    teacher = torch.randn(1, 16, generator=g)
    for backend in ALL_BACKENDS:
        loss, grad = loss_and_grad(backend, student, teacher, temperature=1.0)
        _, ref_grad = loss_and_grad("reference", student.double(), teacher.double(), device="cpu", temperature=1.0)
        assert abs(grad[0, 0].item() - ref_grad[0, 0].item()) < 1e-5, (backend, grad[0, 0], ref_grad[0, 0])


@pytest.mark.parametrize("backend", _sweep_backends())
@pytest.mark.parametrize("offset", [30.0, 43.0, 60.0, 87.0, 88.5, 89.0, 120.0, 400.0, 1e4, 1e6],
                         ids=lambda v: f"{v:g}")
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["large", "very_negative"])
def test_many_logits_shifted(backend, offset, sign):
    """Every logit of a head near (or past) the exp limits: sums of many large exps
    overflow long before one does; very negative ones underflow together."""
    heads = (3, 37, 300)
    student, teacher = make_logits(_small(backend, 3), heads, torch.float32, seed=2, offset=sign * offset)
    assert_matches_float64(backend, student, teacher, splits=list(heads), temperature=[1.0, 2.0, 0.5])


@pytest.mark.parametrize("backend", _sweep_backends())
@pytest.mark.parametrize("spread", [10.0, 60.0, 90.0, 130.0, 300.0])
def test_wide_spread_within_a_head(backend, spread):
    """Logits spread over [-spread, spread]: exps relative to the max reach denormals
    and underflow inside one head, the max moving across tiles (ramp)."""
    heads = (5000,) if backend != "triton" or torch.cuda.is_available() else (1500,)
    student, teacher = make_logits(2, heads, torch.float32, seed=3, scale=spread / 3, ramp=spread)
    assert_matches_float64(backend, student, teacher, temperature=1.0)


# ---- denormals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _sweep_backends())
def test_denormal_exps(backend):
    """Classes whose exp relative to the max is denormal (2^-126 .. 2^-149) or just
    above: they carry no weight, but must not upset the rest (FTZ/DAZ on the CPU)."""
    x = torch.tensor([0.0, -86.0, -87.3, -88.0, -95.0, -100.0, -103.0, -104.0, -110.0, 1.5, -2.0])
    student = torch.stack([x, x.flip(0), x * 0.5])
    teacher = torch.stack([x.flip(0), x, x + 1.0])
    assert_matches_float64(backend, student, teacher, temperature=1.0)
    assert_matches_float64(backend, student * 3, teacher * 3, temperature=3.0)


@pytest.mark.parametrize("backend", _sweep_backends())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_denormal_logits(backend, dtype):
    """Logits that are themselves denormal in their dtype (or tiny), small temperatures."""
    tiny = torch.finfo(dtype).tiny
    g = torch.Generator().manual_seed(4)
    student = (torch.randn(2, 12, generator=g, dtype=torch.float64) * tiny * 0.5).to(dtype)
    teacher = (torch.randn(2, 12, generator=g, dtype=torch.float64) * tiny * 0.5).to(dtype)
    for tau in (MIN_TEMPERATURE, 1.0):
        assert_matches_float64(backend, student, teacher, temperature=tau)


# ---- dtype maxima divided by the temperature -------------------------------------------------------

@pytest.mark.parametrize("backend", _sweep_backends())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 0.5, 1.0, 4.0, MAX_TEMPERATURE], ids=lambda v: f"{v:g}")
def test_dtype_maxima(backend, dtype, temperature):
    """The largest finite logit of each dtype, on either side and with either sign,
    divided by small and large temperatures (fp32/bf16 maxima over tau < 1 overflow
    float32 if divided before the max is subtracted)."""
    big = torch.finfo(dtype).max
    student, teacher = make_logits(6, (9,), torch.float64, seed=5)
    student[0, 3] = big                     # one huge student logit
    teacher[1, 3] = big                     # one huge teacher logit
    student[2, 3] = big
    teacher[2, 3] = big                     # both, same class: KL from the rest
    student[3, 3] = -big                    # a very negative student logit under teacher mass
    teacher[4, 4] = -big                    # a very negative teacher logit (no mass)
    student[5, 2], teacher[5, 5] = big, big  # both huge, different classes
    student, teacher = student.to(dtype), teacher.to(dtype)
    assert_matches_float64(backend, student, teacher, temperature=temperature)


# ---- the supported temperature range ---------------------------------------------------------------

@pytest.mark.parametrize("backend", _sweep_backends())
@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 1e-5, 1e-3, 0.05, 1.0, 7.0, 30.0, MAX_TEMPERATURE],
                         ids=lambda v: f"{v:g}")
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0], ids=lambda v: f"logits{v:g}")
def test_temperature_range(backend, temperature, scale):
    """Both ends of the supported range and points between, on small, ordinary and
    large logits; heads of 1 to 1000 classes."""
    heads = (1, 2, 17, 1000)
    student, teacher = make_logits(_small(backend, 3), heads, torch.float32, seed=6, scale=scale)
    # One row where the student equals the teacher: the KL is exactly 0.
    student[0] = teacher[0]
    loss, _ = assert_matches_float64(backend, student, teacher, splits=list(heads), temperature=temperature,
                                     weights=[1.0, 0.5, 2.0, 1.0])
    assert loss[0] == 0


# ---- -inf, +inf, NaN --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _sweep_backends())
@pytest.mark.parametrize("offset", [0.0, 200.0], ids=["ordinary", "large"])
def test_non_finite_logits(backend, offset):
    heads = (6, 40)
    student, teacher = make_logits(9, heads, torch.float32, seed=7, offset=offset)
    teacher[0, 10:20] = float("-inf")      # masked teacher classes ...
    student[0, 12:15] = float("-inf")      # ... the student -inf there too: finite
    student[1, 8] = float("-inf")          # student -inf under teacher mass: +inf
    teacher[2, :6] = float("-inf")         # head 0 fully masked: adds nothing
    student[3, 6:] = float("-inf")         # head 1's student all -inf: +inf
    teacher[4, :] = float("-inf")          # every head masked: 0
    student[5, 7] = float("nan")           # NaN in: NaN out (that head only)
    teacher[6, 2] = float("nan")
    student[7, 30] = float("inf")          # +inf: the softmax is undefined, NaN
    teacher[8, 0] = float("inf")
    loss, grad = assert_matches_float64(backend, student, teacher, splits=list(heads), temperature=2.0)
    assert torch.isnan(loss[[5, 6, 7, 8]]).all()
    assert torch.isfinite(loss[[0, 2, 4]]).all() and torch.isinf(loss[[1, 3]]).all()
    assert torch.isnan(grad[5, 6:]).all() and torch.isfinite(grad[5, :6]).all()


@pytest.mark.parametrize("backend", _sweep_backends())
def test_zero_weight_switches_a_head_off(backend):
    """A head of weight 0 adds exactly 0, also where its KL is +inf; NaN stays NaN."""
    student, teacher = make_logits(3, (4, 5), torch.float32, seed=8)
    student[0, 1] = float("-inf")  # +inf KL in head 0
    student[1, 2] = float("nan")
    loss, grad = loss_and_grad(backend, student, teacher, splits=[4, 5], weights=[0.0, 1.0], reduction="none")
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isnan(loss[1])
    assert (grad[[0, 2], :4] == 0).all()
    assert_matches_float64(backend, student, teacher, splits=[4, 5], weights=[0.0, 1.0])


# ---- 1-class and huge heads --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _sweep_backends())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 50.0, 1e4])
def test_one_class_heads_are_exactly_zero(backend, dtype, offset):
    """Issue 8 item 3: a 1-class head has p_s = p_t = 1, so KL = 0 and gradient 0,
    exactly (the CPU's fast exp gave ~1e-7 and ~1e-8)."""
    heads = (1, 7, 1, 1)
    student, teacher = make_logits(5, heads, dtype, seed=9, offset=offset)
    loss, grad = loss_and_grad(backend, student, teacher, splits=list(heads), temperature=[0.5, 2.0, 1.0, 3.0],
                               reduction="none")
    _, grad_all_ones = loss_and_grad(backend, student[:, [0, 8, 9]], teacher[:, [0, 8, 9]], splits=[1, 1, 1],
                                     reduction="none")
    assert (grad[:, [0, 8, 9]] == 0).all()
    assert (grad_all_ones == 0).all()
    only_ones = rcfast.multihead_kd_loss(student[:, [0, 8, 9]].to(device_for(backend)),
                                         teacher[:, [0, 8, 9]].to(device_for(backend)), splits=[1, 1, 1],
                                         reduction="none", backend=backend)
    assert (only_ones == 0).all()
    assert_matches_float64(backend, student, teacher, splits=list(heads), temperature=[0.5, 2.0, 1.0, 3.0])


@pytest.mark.slow
@pytest.mark.parametrize("backend", _sweep_backends())
@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["ordinary", "large"])
def test_huge_head(backend, offset):
    """One head of 256k classes (many tiles; the running max moves along the ramp)."""
    student, teacher = make_logits(1, (262_144,), torch.float32, seed=10, offset=offset, ramp=40.0)
    assert_matches_float64(backend, student, teacher, temperature=2.0)


# ---- the second derivative at the boundaries -------------------------------------------------------------

def _hessian_vector_product(backend, student, teacher, vector, **kwargs):
    device = device_for(backend) if student.dtype != torch.float64 else "cpu"
    s = student.to(device).clone().requires_grad_(True)
    loss = rcfast.multihead_kd_loss(s, teacher.to(device), backend=backend, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), s, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * vector.to(device)).sum(), s)
    return hvp.cpu().double()


@pytest.mark.parametrize("backend", _sweep_backends())
@pytest.mark.parametrize("offset,temperature", [(0.0, 1.0), (1e4, 1.0), (3e37, 0.5), (0.0, MIN_TEMPERATURE),
                                                (0.0, MAX_TEMPERATURE)], ids=lambda v: f"{v:g}")
def test_double_backward_at_boundaries(backend, offset, temperature):
    """The Hessian-vector product (issue 8 item 4) against float64 autograd of the
    reference, with large logits, both ends of the temperature range and masks."""
    heads = (1, 5, 40)
    student, teacher = make_logits(3, heads, torch.float32, seed=11, offset=offset, scale=3.0 * temperature)
    teacher[0, 8] = float("-inf")
    student[1, 9] = float("-inf")
    teacher[2, :1] = float("-inf")
    vector = torch.randn(student.shape, generator=torch.Generator().manual_seed(12))
    kwargs = dict(splits=list(heads), temperature=temperature, weights=[1.0, 0.5, 2.0])
    got = _hessian_vector_product(backend, student, teacher, vector, **kwargs)
    expected = _hessian_vector_product("reference", student.double(), teacher.double(), vector.double(), **kwargs)
    # |H v| <= 2 |w| max|v| per element; float32 probabilities to a few ulps.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=64 * 2.0 ** -23 * 2 * 2.0 * vector.abs().max().item())


# ---- property-based: loss and gradient of every backend against float64 --------------------------------

@st.composite
def kd_cases(draw, max_classes=300):
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    head_sizes = draw(st.lists(st.integers(1, max_classes), min_size=1, max_size=4))
    batch = draw(st.integers(1, 4))
    log_tau = draw(st.floats(math.log10(MIN_TEMPERATURE), math.log10(MAX_TEMPERATURE)))
    temperatures = [float(10 ** draw(st.floats(log_tau - 1, log_tau + 1).map(
        lambda v: min(max(v, math.log10(MIN_TEMPERATURE)), math.log10(MAX_TEMPERATURE)))))
        for _ in head_sizes]
    weights = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=len(head_sizes),
                            max_size=len(head_sizes)))
    scale = 10 ** draw(st.floats(-3, 4))
    offset = draw(st.sampled_from([0.0, 1.0, -1.0])) * 10 ** draw(st.floats(0, 5))
    seed = draw(st.integers(0, 2**16))
    finite_max = torch.finfo(dtype).max
    student, teacher = make_logits(batch, head_sizes, torch.float64, seed=seed, scale=scale, offset=offset)
    student, teacher = student.clamp(-finite_max, finite_max), teacher.clamp(-finite_max, finite_max)
    # Masks: -inf on either side, now and then a whole head.
    g = torch.Generator().manual_seed(seed + 1)
    for tensor in (student, teacher):
        if draw(st.booleans()):
            tensor[torch.rand(tensor.shape, generator=g) < 0.1] = float("-inf")
    if draw(st.booleans()) and draw(st.booleans()):
        student[0] = teacher[0]
    return dict(student=student.to(dtype), teacher=teacher.to(dtype), splits=head_sizes,
                temperature=temperatures, weights=weights)


def _fuzz(backend, case):
    student, teacher = case.pop("student"), case.pop("teacher")
    assert_matches_float64(backend, student, teacher, **case)


@pytest.mark.parametrize("backend", backend_params([b for b in ALL_BACKENDS if b != "triton"]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=kd_cases())
def test_fuzz_loss_and_gradient_against_float64(backend, case):
    _fuzz(backend, case)


@pytest.mark.interpreter
@pytest.mark.skipif("triton" not in ALL_BACKENDS, reason="triton backend unavailable")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, test_gpu_fuzz_against_float64 fuzzes triton")
@settings(max_examples=25, deadline=None)
@given(case=kd_cases(max_classes=80))
def test_fuzz_triton_against_float64(case):
    _fuzz("triton", case)


# ---- a larger fuzz on a GPU ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@settings(max_examples=300, deadline=None)
@given(case=kd_cases(max_classes=5000))
def test_gpu_fuzz_against_float64(backend, case):
    _fuzz(backend, case)
