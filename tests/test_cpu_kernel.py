"""The ``cpu`` backend's own tests: rcfast._C's kernel beyond the shared backend matrix.

tests/test_kd_loss.py compares every backend with the reference through the
public API. This file covers what is specific to the C++ CPU kernel:

- the registered schema is exactly ``kernel_contract.OP_SCHEMA``;
- the vector path chosen here follows the CPU (``/proc/cpuinfo``) and
  ``ATEN_CPU_CAPABILITY``, and *each* compiled path (default, avx2, avx512),
  forced in a subprocess, matches the reference — the direct pass and its
  online fallback, the exp cache and the recompute pass 2, tails, all dtypes;
- the exact -inf / NaN semantics, including the fallback cases;
- 1 and 2 threads give bitwise-identical results;
- the memory the op allocates beyond its outputs stays within 5% of the
  gradient (plus the [B, H] float64 per-task losses);
- misuse of the raw op raises clear errors (TORCH_CHECK).

Run one capability's checks by hand with
``ATEN_CPU_CAPABILITY=avx2 python tests/test_cpu_kernel.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.join(REPO_ROOT, "tests")
for path in (REPO_ROOT, TESTS_DIR):  # also run as a script, by test_each_capability_matches_reference
    if path not in sys.path:
        sys.path.insert(0, path)

import rcfast  # noqa: E402
from helpers.kd_compare import TOLERANCES, assert_matches_reference, loss_and_grad, make_logits  # noqa: E402
from rcfast.ops.kernel_contract import OP_SCHEMA, REDUCTION_CODES  # noqa: E402

pytestmark = pytest.mark.skipif("cpu" not in rcfast.available_backends(), reason="rcfast._C is not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _op():
    from rcfast.ops import cpu_backend

    return cpu_backend.multihead_kd_fwd


def _capability():
    from rcfast.ops import cpu_backend

    return cpu_backend.cpu_capability()


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _hardware_capability() -> str:
    """The best path this CPU can run, by ATen's rule (DispatchStub's cpuinfo checks)."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


_ORDER = ["default", "avx2", "avx512"]


def _expected_capability() -> str:
    hardware = _hardware_capability()
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if forced in _ORDER:
        return _ORDER[min(_ORDER.index(forced), _ORDER.index(hardware))]
    return hardware


# Shapes that reach every code path of the kernel (csrc/cpu/kd_cpu_driver.h, kd_cpu_passes.h):
# - tails of every length, one-class heads;
# - "cached" pass 2 (B large enough for the exp cache to fit 5% of the gradient)
#   and "recompute" pass 2 (B = 2, or a head wider than the budget allows);
# - heads wider than one tile (2048 classes) for the online fallback's rescaling.
PATH_CASES = [
    ("tails", 3, (1, 2, 7, 15, 16, 17, 31, 33, 63, 65)),
    ("a_cached", 96, (1000, 196, 100, 397)),
    ("a_recompute", 2, (1000, 196, 100, 397)),
    ("wide_cached", 64, (5000, 33)),
    ("wide_recompute", 2, (9000,)),
]


def _check_paths_against_reference():
    """Everything a capability path must get right; run in-process and per forced capability."""
    for dtype in DTYPES:
        for name, batch, heads in PATH_CASES:
            student, teacher = make_logits(batch, heads, dtype, seed=len(name))
            temps = [0.5 + 0.75 * h for h in range(len(heads))]
            weights = [1.0 + 0.5 * h for h in range(len(heads))]
            for reduction in ("batchmean", "none", "mean", "sum"):
                assert_matches_reference("cpu", student, teacher, splits=list(heads), temperature=temps,
                                         weights=weights, reduction=reduction)
        # Logits beyond the direct pass's range (|x| log2 e > 64): the online fallback,
        # with the running max moving across tiles (increasing logits along the head).
        batch, heads = 4, (5000, 70)
        student, teacher = make_logits(batch, heads, dtype, seed=7, scale=30.0)
        ramp = torch.linspace(0, 400, sum(heads), dtype=torch.float64)
        student = (student.double() + ramp).to(dtype)
        teacher = (teacher.double() + ramp).to(dtype)
        if dtype != torch.float16:  # fp16 cannot hold logits of 400+
            assert_matches_reference("cpu", student, teacher, splits=list(heads), temperature=[1.0, 2.0],
                                     reduction="none")
        # Very negative logits everywhere (max below the direct range).
        student, teacher = make_logits(3, (40, 300), dtype, seed=8, offset=-300.0)
        if dtype != torch.float16:
            assert_matches_reference("cpu", student, teacher, splits=[40, 300], temperature=1.0)
    _check_boundaries()


def _check_boundaries():
    """A cross-section of tests/test_kd_numerics.py's boundary sweeps, so each vector
    path (forced in a subprocess) meets the exp limits, maxima and degenerate heads."""
    import test_kd_numerics as sweeps

    sweeps.test_issue_repro_gradient_near_exp_overflow()
    for side in ("student", "teacher", "both"):
        sweeps.test_one_logit_at_exp_boundaries("cpu", side, 1.0, 1.0)
    for offset in (43.0, 88.5, 400.0):
        sweeps.test_many_logits_shifted("cpu", offset, 1.0)
        sweeps.test_many_logits_shifted("cpu", offset, -1.0)
    sweeps.test_denormal_exps("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sweeps.test_dtype_maxima("cpu", dtype, 0.5)
        sweeps.test_one_class_heads_are_exactly_zero("cpu", dtype, 50.0)
    sweeps.test_non_finite_logits("cpu", 200.0)
    sweeps.test_temperature_range("cpu", 1e-6, 1.0)
    sweeps.test_temperature_range("cpu", 100.0, 1.0)


# --------------------------------------------------------------------------- schema, capability

def test_schema_is_the_contract():
    schema = str(torch.ops.rcfast.multihead_kd_fwd.default._schema)
    assert schema == "rcfast::multihead_kd_fwd" + OP_SCHEMA
    assert str(torch.ops.rcfast.kd_cpu_capability.default._schema) == "rcfast::kd_cpu_capability() -> str"


def test_capability_follows_this_cpu():
    assert _capability() == _expected_capability()
    # And agrees with ATen's own choice (what DispatchStub runs here).
    assert _capability() == torch.backends.cpu.get_cpu_capability().lower()


def _supported_capabilities():
    hardware = _hardware_capability()
    return _ORDER[: _ORDER.index(hardware) + 1]


@pytest.mark.slow
@pytest.mark.parametrize("capability", _ORDER)
def test_each_capability_matches_reference(capability):
    if capability not in _supported_capabilities():
        pytest.skip(f"this CPU cannot run the {capability} path")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"capability": capability, "ok": True}


def test_paths_match_reference_in_process():
    _check_paths_against_reference()


# --------------------------------------------------------------------------- -inf / NaN semantics

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [3.0, 200.0], ids=["direct", "online"])
def test_minus_inf_semantics(dtype, scale):
    heads = [6, 40]
    student, teacher = make_logits(6, heads, dtype, seed=3, scale=scale)
    teacher[0, 10:20] = float("-inf")      # masked teacher classes ...
    student[0, 12:15] = float("-inf")      # ... the student -inf there too: still finite
    student[1, 8] = float("-inf")          # student -inf under teacher mass: +inf
    teacher[2, :6] = float("-inf")         # head 0 fully masked: adds nothing
    student[3, 6:] = float("-inf")         # head 1's student all -inf: +inf
    teacher[4, :] = float("-inf")          # every head masked: 0
    student[4, :3] = float("-inf")
    loss, grad = loss_and_grad("cpu", student, teacher, splits=heads, reduction="none", temperature=2.0)
    ref_loss, ref_grad = loss_and_grad("reference", student, teacher, splits=heads, reduction="none",
                                       temperature=2.0)
    assert torch.isfinite(loss[[0, 2, 4, 5]]).all()
    assert loss[1] == float("inf") and loss[3] == float("inf")
    assert loss[4] == 0 and (grad[4] == 0).all()
    assert (grad[2, :6] == 0).all()
    assert not torch.isnan(grad.float()).any()
    rows = [0, 2, 4, 5]
    loss_rtol, loss_atol, grad_rtol, grad_atol = TOLERANCES[dtype]
    torch.testing.assert_close(loss[rows], ref_loss[rows], rtol=loss_rtol, atol=loss_atol)
    # Row 3's gradient is unspecified by the reference (kernels give -w tau p_t); compare the rest.
    torch.testing.assert_close(grad[[0, 1, 2, 4, 5]], ref_grad[[0, 1, 2, 4, 5]], rtol=grad_rtol,
                               atol=grad_atol * 2)
    # Student all -inf in head 1 of row 3: gradient -w * tau * p_t there (batch scale 1 for "none").
    p_teacher = torch.softmax(teacher[3, 6:].double() / 2.0, dim=0)
    torch.testing.assert_close(grad[3, 6:].double(), -2.0 * p_teacher, rtol=grad_rtol * 4, atol=1e-6)


@pytest.mark.parametrize("where", ["student", "teacher", "student_under_masked_teacher"])
@pytest.mark.parametrize("scale", [3.0, 200.0], ids=["direct", "online"])
def test_nan_in_nan_out(where, scale):
    heads = [5, 3000]  # the wide head spans two tiles of the online pass
    student, teacher = make_logits(3, heads, torch.float32, seed=4, scale=scale)
    if where == "student":
        student[1, 2500] = float("nan")
    elif where == "teacher":
        teacher[1, 2500] = float("nan")
    else:
        teacher[1, 2500] = float("-inf")
        student[1, 2500] = float("nan")
    loss, grad = loss_and_grad("cpu", student, teacher, splits=heads, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(grad[1, 5:]).all()            # the NaN head
    assert torch.isfinite(grad[1, :5]).all()         # the other head of that row
    assert torch.isfinite(grad[[0, 2]]).all()


# --------------------------------------------------------------------------- determinism, memory

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_one_and_two_threads_bitwise_identical(dtype, reduction):
    heads = (1000, 196, 100, 397)
    student, teacher = make_logits(256, heads, dtype, seed=5)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(loss_and_grad("cpu", student, teacher, splits=list(heads), reduction=reduction))
    finally:
        torch.set_num_threads(previous)
    (loss1, grad1), (loss2, grad2) = results
    assert torch.equal(loss1, loss2)
    assert torch.equal(grad1, grad2)


def test_extra_memory_within_budget():
    """Bytes the op allocates beyond its outputs: the exp cache (<= 5% of the
    gradient by construction) plus the [B, H] per-task losses."""
    from torch.profiler import ProfilerActivity, profile

    heads = (1000, 196, 100, 397)
    batch = 512
    student, teacher = make_logits(batch, heads, torch.float32, seed=6)
    offsets = torch.tensor([0, 1000, 1196, 1296, 1693])
    temps, weights = torch.full((4,), 4.0), torch.ones(4)
    op = _op()
    op(student, teacher, offsets, temps, weights, REDUCTION_CODES["batchmean"], True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, grad = op(student, teacher, offsets, temps, weights, REDUCTION_CODES["batchmean"], True)
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.name == "aten::empty" and e.cpu_memory_usage > 0)
    outputs = grad.numel() * grad.element_size() + loss.numel() * loss.element_size()
    budget = 0.05 * grad.numel() * grad.element_size() + batch * len(heads) * 8 + 4096  # float64 per-task losses
    assert outputs <= allocated <= outputs + budget, (allocated, outputs, budget)


# --------------------------------------------------------------------------- raw op misuse

def _good_args():
    student, teacher = make_logits(3, (5, 9), torch.float32, seed=11)
    return [student, teacher, torch.tensor([0, 5, 14]), torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.5]),
            REDUCTION_CODES["batchmean"], True]


def _with(index, value):
    args = _good_args()
    args[index] = value
    return args


BAD_CALLS = [
    ("student must be 2-D", _with(0, torch.randn(3, 14, 1))),
    ("teacher shape", _with(1, torch.randn(3, 13))),
    ("must match student dtype", _with(1, torch.randn(3, 14, dtype=torch.float64))),
    ("student must be float32, float64, bfloat16 or float16", [torch.ones(3, 14, dtype=torch.int32),
                                                               torch.ones(3, 14, dtype=torch.int32),
                                                               *_good_args()[2:]]),
    ("batch size must be > 0", [torch.randn(0, 14), torch.randn(0, 14), *_good_args()[2:]]),
    ("head_offsets must be a 1-D int64", _with(2, torch.tensor([0.0, 5.0, 14.0]))),
    ("head_offsets must start at 0", _with(2, torch.tensor([1, 5, 14]))),
    ("strictly increasing", _with(2, torch.tensor([0, 9, 5]))),
    ("must end at N = 14", _with(2, torch.tensor([0, 5, 13]))),
    ("at least 2 values", _with(2, torch.tensor([0]))),
    ("temperatures must be float32 [H]", _with(3, torch.tensor([2.0]))),
    ("temperatures must be finite and > 0", _with(3, torch.tensor([2.0, 0.0]))),
    ("weights must be float32 [H]", _with(4, torch.tensor([1.0, 0.5], dtype=torch.float64))),
    ("weights must be finite", _with(4, torch.tensor([1.0, float("nan")]))),
    ("reduction must be 0 (none)", _with(5, 7)),
]


@pytest.mark.parametrize("message,args", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_raw_op_misuse_raises(message, args):
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _op()(*args)


def test_raw_op_accepts_non_contiguous_logits():
    args = _good_args()
    base_s, base_t = make_logits(3, (28,), torch.float32, seed=12)
    args[0], args[1] = base_s[:, ::2], base_t[:, 1::2]
    loss, grad = _op()(*args)
    ref_loss, ref_grad = _op()(args[0].contiguous(), args[1].contiguous(), *args[2:])
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def test_forward_only_returns_empty_grad():
    args = _good_args()
    args[6] = False
    loss, grad = _op()(*args)
    assert grad.shape == (0,) and grad.dtype == torch.float32 and loss.shape == ()


if __name__ == "__main__":
    # One capability's checks, run by test_each_capability_matches_reference with
    # ATEN_CPU_CAPABILITY forced; the last stdout line is a JSON verdict.
    _check_paths_against_reference()
    print(json.dumps({"capability": _capability(), "ok": True}))
