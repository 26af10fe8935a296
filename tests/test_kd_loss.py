"""Every fused backend of ``rcfast.multihead_kd_loss`` against the pure-PyTorch reference.

The matrix parametrises over ``rcfast.available_backends()`` (minus the reference
itself), so a backend is tested as soon as it exists here: ``cpu`` when
``rcfast._C`` is built, ``triton`` under ``TRITON_INTERPRET=1`` (set in
conftest.py on machines without a GPU). Triton's interpreter is slow, so its
widest shapes run with few rows.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rcfast
from rcfast.ops.backends import kernel_op
from rcfast.ops.kernel_contract import REDUCTION_CODES

from helpers.kd_compare import (  # tests/ is on sys.path (rootdir conftest.py)
    ALL_BACKENDS, DTYPES, FUSED_BACKENDS, REDUCTIONS, assert_compiled_matches_eager, assert_matches_reference,
    backend_params, device_for, loss_and_grad, make_logits,
)

needs_fused = pytest.mark.skipif(not FUSED_BACKENDS, reason="no fused backend built here")


def on_device(backend, *tensors):
    return [t.to(device_for(backend)) for t in tensors]


def batch_for(backend, num_classes, batch):
    # The Triton interpreter runs one program at a time in NumPy: keep wide heads short.
    if backend == "triton" and num_classes > 5000:
        return min(batch, 2)
    return batch


HEAD_LAYOUTS = [(1,), (2,), (7,), (1000,), (33_000,), (1, 2, 7, 1000), (1000, 196, 100, 397)]


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_sizes", HEAD_LAYOUTS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("batch", [1, 5])
def test_matches_reference(backend, dtype, head_sizes, batch):
    batch = batch_for(backend, sum(head_sizes), batch)
    student, teacher = make_logits(batch, head_sizes, dtype)
    assert_matches_reference(backend, student, teacher, splits=list(head_sizes), temperature=2.0)


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(backend, dtype, reduction):
    student, teacher = make_logits(3, (5, 130, 2), dtype, seed=1)
    loss, _ = assert_matches_reference(backend, student, teacher, splits=[5, 130, 2], reduction=reduction)
    assert loss.shape == ((3,) if reduction == "none" else ())


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradient_is_applied(backend, reduction):
    """The backward multiplies by the incoming gradient, scalar or per row."""
    student, teacher = make_logits(4, (9, 17), torch.float32, seed=2)
    upstream = torch.tensor([0.5, -2.0, 0.0, 3.0]) if reduction == "none" else torch.tensor(-1.7)
    assert_matches_reference(backend, student, teacher, upstream=upstream, splits=[9, 17], reduction=reduction)


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_temperature_and_weights(backend, dtype):
    student, teacher = make_logits(6, (10, 3, 50), dtype, seed=3)
    assert_matches_reference(
        backend, student, teacher, splits=[10, 3, 50],
        temperature=[1.0, 0.5, 7.5], weights=[1.0, 0.0, 2.5],
    )


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
def test_non_contiguous_inputs(backend):
    base_s, base_t = make_logits(7, (80,), torch.float32, seed=4)
    student = base_s[:, ::2]  # strided columns
    teacher = base_t.t().contiguous().t()[:, 1::2]  # column-major storage, strided
    assert not student.is_contiguous() and not teacher.is_contiguous()
    assert_matches_reference(backend, student, teacher, splits=[15, 25])


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_list_inputs_equal_packed(backend):
    student, teacher = on_device(backend, *make_logits(4, (6, 11), torch.float32, seed=5))
    packed_loss, packed_grad = on_device(backend, *loss_and_grad(backend, student, teacher, splits=[6, 11]))
    s_list = [student[:, :6].clone().requires_grad_(True), student[:, 6:].clone().requires_grad_(True)]
    t_list = [teacher[:, :6], teacher[:, 6:]]
    loss = rcfast.multihead_kd_loss(s_list, t_list, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.detach(), packed_loss)
    torch.testing.assert_close(torch.cat([s.grad for s in s_list], 1), packed_grad)


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_classes(backend, dtype):
    student, teacher = make_logits(4, (8, 300), dtype, seed=6)
    teacher[0, :3] = float("-inf")  # masked teacher classes: p = 0
    teacher[1, 10:200] = float("-inf")
    student[1, 50:60] = float("-inf")  # student -inf exactly where the teacher is masked
    student[2, 0] = float("-inf")
    teacher[2, 0] = float("-inf")
    loss, grad = assert_matches_reference(backend, student, teacher, splits=[8, 300], reduction="none")
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad.float()).all()


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
def test_student_minus_inf_under_teacher_mass_is_inf(backend):
    student, teacher = make_logits(3, (12,), torch.float32, seed=7)
    student[1, 4] = float("-inf")
    loss, grad = loss_and_grad(backend, student, teacher, reduction="none")
    ref_loss, ref_grad = loss_and_grad("reference", student, teacher, reduction="none", device=device_for(backend))
    assert loss[1] == float("inf") and ref_loss[1] == float("inf")
    torch.testing.assert_close(loss[[0, 2]], ref_loss[[0, 2]])
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=1e-7)


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_teacher_head_adds_nothing(backend, dtype):
    student, teacher = make_logits(3, (6, 40), dtype, seed=18)
    teacher[0, :6] = float("-inf")  # row 0: head 0 has no teacher distribution
    teacher[1, :] = float("-inf")  # row 1: neither head has one
    student[1, 6:9] = float("-inf")
    loss, grad = assert_matches_reference(backend, student, teacher, splits=[6, 40], reduction="none")
    assert loss[1] == 0 and (grad[1] == 0).all()
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_fully_masked_teacher_head_with_student_nan_is_nan(backend):
    student, teacher = on_device(backend, *make_logits(2, (3, 4), torch.float32, seed=20))
    teacher[0, :3] = float("-inf")
    student[0, 1] = float("nan")
    teacher[1, :3] = float("-inf")  # masked, no NaN: adds 0
    with torch.no_grad():
        loss = rcfast.multihead_kd_loss(student, teacher, splits=[3, 4], reduction="none", backend=backend)
    ref = rcfast.multihead_kd_loss(student, teacher, splits=[3, 4], reduction="none", backend="reference")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    torch.testing.assert_close(loss[1], ref[1])


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_student_head_all_minus_inf_is_inf(backend):
    student, teacher = on_device(backend, *make_logits(2, (5, 9), torch.float32, seed=19))
    student[0, :5] = float("-inf")
    with torch.no_grad():
        loss = rcfast.multihead_kd_loss(student, teacher, splits=[5, 9], reduction="none", backend=backend)
    assert loss[0] == float("inf") and torch.isfinite(loss[1])


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_nan_out(backend, where):
    student, teacher = on_device(backend, *make_logits(3, (20,), torch.float32, seed=8))
    (student if where == "student" else teacher)[2, 5] = float("nan")
    loss, _ = loss_and_grad(backend, student, teacher, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4)],
                         ids=["fp32-1e4", "fp16-6e4", "bf16-1e4"])
def test_extreme_logits(backend, dtype, magnitude):
    g = torch.Generator().manual_seed(9)
    signs = torch.randint(0, 2, (4, 64), generator=g).float() * 2 - 1
    student = (signs * magnitude * torch.rand(4, 64, generator=g)).to(dtype)
    teacher = (signs.flip(1) * magnitude * torch.rand(4, 64, generator=g)).to(dtype)
    loss, grad = assert_matches_reference(backend, student, teacher, splits=[14, 50], temperature=1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("backend", backend_params([b for b in ALL_BACKENDS if b != "triton"]))
def test_gradcheck_float64(backend):
    student, teacher = make_logits(3, (4, 6), torch.float64, seed=10, scale=1.0)
    student.requires_grad_(True)
    for reduction in REDUCTIONS:
        fn = lambda s: rcfast.multihead_kd_loss(  # noqa: E731
            s, teacher, splits=[4, 6], temperature=[2.0, 0.7], weights=[1.0, 0.3],
            reduction=reduction, backend=backend)
        assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7)


# ---- the autograd contract: double backward, retain_graph, the zero-copy hand-over ---------------

@pytest.mark.parametrize("backend", backend_params([b for b in ALL_BACKENDS if b != "triton"]))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_float64(backend, reduction):
    """The second derivative (issue 8 item 4): the fused backward is differentiable,
    its Hessian-vector product checked numerically, with masked classes and a fully
    masked head in the batch. (Triton takes no float64: see the meta-gradient test.)"""
    student, teacher = make_logits(3, (4, 6), torch.float64, seed=10, scale=1.0)
    teacher[0, 1] = float("-inf")
    teacher[1, :4] = float("-inf")
    student.requires_grad_(True)

    def fn(s):
        return rcfast.multihead_kd_loss(s, teacher, splits=[4, 6], temperature=[2.0, 0.7], weights=[1.0, 0.3],
                                        reduction=reduction, backend=backend)

    assert torch.autograd.gradgradcheck(fn, (student,), eps=1e-6, atol=1e-6)


def _meta_gradient(backend, dtype=torch.float32, seed=30):
    """A MAML-style meta-gradient: one inner SGD step on the KD loss, differentiated through."""
    g = torch.Generator().manual_seed(seed)
    device = device_for(backend)
    theta = torch.randn(6, 13, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_(True)
    x_inner, x_outer = (torch.randn(4, 6, generator=g, dtype=torch.float64).to(dtype).to(device) for _ in range(2))
    t_inner, t_outer = (torch.randn(4, 13, generator=g, dtype=torch.float64).mul(2).to(dtype).to(device)
                        for _ in range(2))
    kwargs = dict(splits=[5, 8], temperature=[2.0, 0.5], weights=[1.0, 0.7], backend=backend)
    inner = rcfast.multihead_kd_loss(x_inner @ theta, t_inner, **kwargs)
    (step,) = torch.autograd.grad(inner, theta, create_graph=True)
    adapted = theta - 0.5 * step
    outer = rcfast.multihead_kd_loss(x_outer @ adapted, t_outer, **kwargs)
    (meta,) = torch.autograd.grad(outer, theta)
    return meta.cpu()


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
def test_meta_gradient_matches_reference(backend):
    """Issue 8 item 4: this meta-gradient was 25 % off when the backward ignored the
    gradient buffer's own dependence on the student."""
    meta = _meta_gradient(backend)
    expected = _meta_gradient("reference")
    torch.testing.assert_close(meta, expected, rtol=1e-4, atol=1e-5)


def test_meta_gradient_second_order_term_is_significant():
    """The meta-gradient test would not notice a missing Hessian term unless that term is large."""
    theta_grad = _meta_gradient("reference")

    g = torch.Generator().manual_seed(30)
    theta = torch.randn(6, 13, generator=g, dtype=torch.float64).float().requires_grad_(True)
    x_inner, x_outer = (torch.randn(4, 6, generator=g, dtype=torch.float64).float() for _ in range(2))
    t_inner, t_outer = (torch.randn(4, 13, generator=g, dtype=torch.float64).mul(2).float() for _ in range(2))
    kwargs = dict(splits=[5, 8], temperature=[2.0, 0.5], weights=[1.0, 0.7], backend="reference")
    inner = rcfast.multihead_kd_loss(x_inner @ theta, t_inner, **kwargs)
    (step,) = torch.autograd.grad(inner, theta)  # first-order approximation: step is a constant
    outer = rcfast.multihead_kd_loss(x_outer @ (theta - 0.5 * step), t_outer, **kwargs)
    (first_order,) = torch.autograd.grad(outer, theta)
    assert (first_order - theta_grad).norm() > 0.05 * theta_grad.norm()


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_retain_graph_repeated_backward(backend, reduction):
    """Issue 8 item 5: three backward passes over one retained graph accumulate three
    gradients (the hand-over of the saved buffer used to let autograd add into it)."""
    student, teacher = on_device(backend, *make_logits(3, (5, 9), torch.float32, seed=21))
    student.requires_grad_(True)
    loss = rcfast.multihead_kd_loss(student, teacher, splits=[5, 9], reduction=reduction, backend=backend)
    upstream = torch.ones_like(loss)
    (single,) = torch.autograd.grad(loss, student, upstream, retain_graph=True)
    single = single.clone()
    for _ in range(3):
        loss.backward(upstream, retain_graph=True)
    torch.testing.assert_close(student.grad, 3 * single)
    loss.backward(upstream)  # the last one frees the graph (and may hand the buffer over)
    torch.testing.assert_close(student.grad, 4 * single)


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_gradient_accumulates_over_steps(backend):
    """Two forward/backward steps into one .grad (the first may be the stolen buffer,
    which the second adds into in place), then an in-place zero_grad and a third."""
    student, teacher = on_device(backend, *make_logits(3, (5, 9), torch.float32, seed=22))
    student.requires_grad_(True)
    (expected,) = torch.autograd.grad(
        rcfast.multihead_kd_loss(student, teacher, splits=[5, 9], backend=backend), student)
    expected = expected.clone()
    for _ in range(2):
        rcfast.multihead_kd_loss(student, teacher, splits=[5, 9], backend=backend).backward()
    torch.testing.assert_close(student.grad, 2 * expected)
    student.grad.zero_()
    rcfast.multihead_kd_loss(student, teacher, splits=[5, 9], backend=backend).backward(torch.tensor(-0.5))
    torch.testing.assert_close(student.grad, -0.5 * expected)


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
def test_zero_copy_hand_over_only_when_safe(backend):
    """The forward-written gradient becomes the student's gradient without a copy when
    the graph is freed by this backward, and never when the graph is kept."""
    student, teacher, offsets, temperatures, weights = on_device(
        backend, *make_logits(3, (5, 9), torch.float32, seed=23),
        torch.tensor([0, 5, 14]), torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.5]))
    student.requires_grad_(True)
    op = kernel_op(backend)
    args = (teacher, offsets, temperatures, weights, REDUCTION_CODES["batchmean"], True)

    loss, buffer = op(student, *args)
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.data_ptr() == buffer.data_ptr()  # handed over, not copied

    loss, buffer = op(student, *args)
    kept = buffer.clone()
    (grad,) = torch.autograd.grad(loss, student, retain_graph=True)
    assert grad.data_ptr() != buffer.data_ptr()
    grad.add_(1.0)  # the caller owns its gradient: the saved buffer is untouched
    assert torch.equal(buffer, kept)
    (again,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(again, kept)


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_create_graph_then_plain_second_backward(backend):
    """A gradient penalty: ||grad||^2 backpropagated with a plain backward (the second
    pass runs with grad mode off and must still use the Hessian-vector product)."""
    def penalty_grad(b):
        student, teacher = on_device(b, *make_logits(4, (6, 10), torch.float32, seed=24))
        student.requires_grad_(True)
        loss = rcfast.multihead_kd_loss(student, teacher, splits=[6, 10], temperature=[1.5, 3.0], backend=b)
        (grad,) = torch.autograd.grad(loss, student, create_graph=True)
        (loss + grad.square().sum()).backward()
        return student.grad.cpu()

    torch.testing.assert_close(penalty_grad(backend), penalty_grad("reference"), rtol=1e-4, atol=1e-6)


# ---- torch.compile -----------------------------------------------------------------------------

def _compile_cases(backend):
    module = rcfast.MultiHeadKDLoss(splits=[3, 4], temperature=[2.0, 0.5], backend=backend)
    return {
        "symbolic_temperature": (lambda s, t, tau: rcfast.multihead_kd_loss(
            s, t, splits=[3, 4], temperature=tau, backend=backend), True),
        "default_temperature": (lambda s, t, tau: rcfast.multihead_kd_loss(s, t, splits=[3, 4], backend=backend),
                                False),
        "module": (lambda s, t, tau: module(s, t), False),
    }


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("case", ["symbolic_temperature", "default_temperature", "module"])
def test_torch_compile_dynamic_one_graph(backend, case):
    """Issue 8 item 6: dynamic shapes and symbolic float temperatures trace as one graph,
    with fullgraph=True, and later batch sizes and temperatures reuse it."""
    from torch._dynamo.testing import CompileCounter

    fn, uses_tau = _compile_cases(backend)[case]
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for batch, tau in ((5, 2.0), (7, 3.5), (2, 0.25)):
        student, teacher = on_device(backend, *make_logits(batch, (3, 4), torch.float32, seed=batch))
        s_eager = student.clone().requires_grad_(True)
        s_compiled = student.clone().requires_grad_(True)
        eager = fn(s_eager, teacher, tau)
        got = compiled(s_compiled, teacher, tau)
        eager.backward()
        got.backward()
        torch.testing.assert_close(got, eager)
        torch.testing.assert_close(s_compiled.grad, s_eager.grad)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for {case}"
    assert counter.op_count > 0
    torch._dynamo.reset()


@pytest.mark.parametrize("case", ["symbolic_temperature", "module"])
def test_torch_compile_explain_no_graph_break(case):
    fn, _ = _compile_cases("auto")[case]
    student, teacher = make_logits(5, (3, 4), torch.float32, seed=25)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(student.requires_grad_(True), teacher, 2.0)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()


def test_temperature_out_of_range_under_compile_still_names_it():
    compiled = torch.compile(lambda s, t, tau: rcfast.multihead_kd_loss(s, t, temperature=tau),
                             backend="eager", dynamic=True)
    torch._dynamo.reset()
    student, teacher = make_logits(2, (5,), torch.float32)
    compiled(student, teacher, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        compiled(student, teacher, 1e-9)
    torch._dynamo.reset()


# ---- the supported temperature range and the cached head tables -----------------------------------

@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("temperature", [1e-9, 9.9e-7, 100.5, 1e6, float("inf"), float("nan"), 0.0, -1.0])
def test_temperature_outside_supported_range_raises(backend, temperature):
    """Issue 8 item 2: tau = 1e-9 used to give NaN on cpu; every value outside
    [MIN_TEMPERATURE, MAX_TEMPERATURE] is refused, naming the argument."""
    student, teacher = on_device(backend, *make_logits(2, (4, 3), torch.float32))
    with pytest.raises(ValueError, match="temperature"):
        rcfast.multihead_kd_loss(student, teacher, splits=[4, 3], temperature=[2.0, temperature], backend=backend)


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_temperature_range_ends_are_accepted(backend):
    from rcfast.ops.kernel_contract import MAX_TEMPERATURE, MIN_TEMPERATURE

    student, teacher = on_device(backend, *make_logits(2, (4, 3), torch.float32))
    loss = rcfast.multihead_kd_loss(student, teacher, splits=[4, 3], temperature=[MIN_TEMPERATURE, MAX_TEMPERATURE],
                                    backend=backend)
    assert torch.isfinite(loss)


def test_head_tables_are_built_once():
    """Issue 9 item 3: the offsets/temperatures/weights tensors are cached per
    (splits, temperatures, weights, device): a second call builds none of them."""
    from rcfast.ops import multihead_kd

    student, teacher = make_logits(3, (5, 9), torch.float32, seed=26)
    kwargs = dict(splits=[5, 9], temperature=[2.0, 3.25], weights=[1.0, 0.125])
    built = []
    real_build = multihead_kd._build_head_tables

    def counting_build(*args):
        built.append(args)
        return real_build(*args)

    multihead_kd._cached_head_tables.cache_clear()
    cached = functools.lru_cache(maxsize=8)(counting_build)
    original = multihead_kd._cached_head_tables
    multihead_kd._cached_head_tables = cached
    try:
        first = rcfast.multihead_kd_loss(student, teacher, **kwargs)
        second = rcfast.multihead_kd_loss(student, teacher, **kwargs)
        assert len(built) == 1
        rcfast.multihead_kd_loss(student, teacher, **dict(kwargs, temperature=[2.0, 3.5]))
        assert len(built) == 2  # another setting is another entry
    finally:
        multihead_kd._cached_head_tables = original
    assert torch.equal(first, second)
    assert original.cache_info().maxsize <= 16  # bounded


def test_head_tables_second_call_creates_no_tensor():
    """The same, seen from the dispatcher: the second call runs no factory or copy op
    for the tables (torch.tensor dispatches aten::lift_fresh and a copy)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    student, teacher = make_logits(3, (5, 9), torch.float32, seed=27)
    kwargs = dict(splits=[5, 9], temperature=[2.0, 1.75], weights=[1.0, 0.5])
    with Recorder() as first:
        rcfast.multihead_kd_loss(student, teacher, **kwargs)
    with Recorder() as second:
        rcfast.multihead_kd_loss(student, teacher, **kwargs)
    created = {"aten::lift_fresh", "aten::_to_copy", "aten::scalar_tensor"}
    assert created & set(first.ops), first.ops  # the recorder sees table creation when it happens
    assert not created & set(second.ops), second.ops


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_tables_cached_under_inference_mode_serve_training(backend):
    """A first call under torch.inference_mode() (evaluation) must not cache inference
    tensors that a later training call would have to save for backward."""
    student, teacher = on_device(backend, *make_logits(3, (5, 9), torch.float32, seed=29))
    kwargs = dict(splits=[5, 9], temperature=[2.0, 0.375], weights=[1.0, 0.625], backend=backend)
    with torch.inference_mode():
        evaluated = rcfast.multihead_kd_loss(student, teacher, **kwargs)
    student.requires_grad_(True)
    loss = rcfast.multihead_kd_loss(student, teacher, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss.detach(), evaluated)
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params([b for b in FUSED_BACKENDS if b in ("triton", "cuda")]))
def test_no_host_sync_per_call_on_gpu(backend):
    """Issue 9 item 3 on a GPU: after a warm-up, forward + backward run under
    torch.cuda.set_sync_debug_mode("error") (no blocking copy, no .item())."""
    student, teacher = make_logits(64, (1000, 100), torch.bfloat16, seed=28, device="cuda")
    student.requires_grad_(True)
    kwargs = dict(splits=[1000, 100], temperature=[4.0, 2.0], weights=[1.0, 0.5], backend=backend)
    rcfast.multihead_kd_loss(student, teacher, **kwargs).backward()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            student.grad = None
            rcfast.multihead_kd_loss(student, teacher, **kwargs).backward()
            rcfast.multihead_kd_loss(student, teacher, **dict(kwargs, reduction="none")).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert torch.isfinite(student.grad.float()).all()


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(backend, reduction, requires_grad):
    student, teacher, offsets, temperatures, weights = on_device(
        backend, *make_logits(3, (5, 9), torch.float32, seed=11),
        torch.tensor([0, 5, 14]), torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.5]))
    student.requires_grad_(requires_grad)
    args = (student, teacher, offsets, temperatures, weights, REDUCTION_CODES[reduction], requires_grad)
    torch.library.opcheck(kernel_op(backend), args)


@pytest.mark.parametrize("backend", backend_params([b for b in ALL_BACKENDS if b in ("reference", "cpu")]))
def test_torch_compile_fullgraph(backend):
    student, teacher = make_logits(5, (7, 30), torch.float32, seed=12)

    def step(s, t):
        return rcfast.multihead_kd_loss(s, t, splits=[7, 30], temperature=[2.0, 4.0], backend=backend) * 2.0

    assert_compiled_matches_eager(step, student, teacher)


@needs_fused
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    head_sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
    batch=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES),
    temperature=st.floats(0.25, 8.0),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(backend, head_sizes, batch, dtype, temperature, reduction, seed):
    student, teacher = make_logits(batch, head_sizes, dtype, seed=seed)
    assert_matches_reference(backend, student, teacher, splits=head_sizes, temperature=temperature,
                             reduction=reduction)


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_gradient_flows_to_student_only(backend):
    student, teacher = on_device(backend, *make_logits(2, (5,), torch.float32, seed=13))
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    rcfast.multihead_kd_loss(student, teacher, backend=backend).backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_no_grad_forward_matches(backend):
    student, teacher = on_device(backend, *make_logits(3, (4, 40), torch.float32, seed=14))
    with torch.no_grad():
        loss = rcfast.multihead_kd_loss(student, teacher, splits=[4, 40], backend=backend)
    ref = rcfast.multihead_kd_loss(student, teacher, splits=[4, 40], backend="reference")
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_teacher_in_another_dtype(backend):
    student, teacher = make_logits(3, (25,), torch.float32, seed=15)
    student = student.to(torch.bfloat16)
    loss, grad = loss_and_grad(backend, student, teacher)
    ref_loss, ref_grad = loss_and_grad("reference", student, teacher.to(torch.bfloat16))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, ref_grad, rtol=1.6e-2, atol=1e-4)


def test_module_form_equals_function():
    student, teacher = make_logits(4, (3, 8), torch.float32, seed=16)
    module = rcfast.MultiHeadKDLoss(splits=[3, 8], temperature=[1.5, 3.0], weights=[2.0, 1.0], reduction="sum")
    expected = rcfast.multihead_kd_loss(student, teacher, splits=[3, 8], temperature=[1.5, 3.0],
                                        weights=[2.0, 1.0], reduction="sum")
    torch.testing.assert_close(module(student, teacher), expected)
    assert "splits=[3, 8]" in repr(module)


def test_reference_matches_torch_kl_div():
    """The reference is itself checked against torch's kl_div on ordinary inputs."""
    student, teacher = make_logits(6, (10, 4), torch.float32, seed=17)
    ref = rcfast.multihead_kd_loss(student, teacher, splits=[10, 4], temperature=[2.0, 3.0],
                                   weights=[1.0, 0.5], backend="reference")
    expected = 0
    for (s, t), tau, w in zip(zip(student.split([10, 4], 1), teacher.split([10, 4], 1)), [2.0, 3.0], [1.0, 0.5]):
        expected = expected + w * tau**2 * torch.nn.functional.kl_div(
            torch.log_softmax(s / tau, 1), torch.log_softmax(t / tau, 1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(ref, expected)


def test_extension_is_built():
    """CI must not pass by silently skipping the C++ backend."""
    if os.environ.get("RCFAST_SKIP_EXTENSION") == "1":
        pytest.skip("built without the extension on purpose (RCFAST_SKIP_EXTENSION=1)")
    assert "cpu" in rcfast.available_backends(), rcfast.ops.backends.unavailable_reason("cpu")


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="cpu backend not built")
def test_auto_picks_cpu_for_cpu_tensors():
    from rcfast.ops.backends import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


@pytest.mark.slow  # a fresh Python subprocess
def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['rcfast._C'] = None\n"  # makes `from rcfast import _C` raise ImportError
        "import rcfast\n"
        "assert rcfast.available_backends()[:1] == ['reference'] and 'cpu' not in rcfast.available_backends()\n"
        "s, t = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    rcfast.multihead_kd_loss(s, t).backward()\n"
        "    rcfast.multihead_kd_loss(s, t)\n"
        "msgs = [str(w.message) for w in caught]\n"
        "assert len(msgs) == 1 and 'reference' in msgs[0], msgs\n"
        "assert s.grad is not None\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


# ---- bad calls raise clear errors naming the argument -------------------------------------------

def _s(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(student=_s(2, 5), teacher=_s(2, 6)), ValueError, "same shape"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), splits=[2, 2]), ValueError, "splits"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), splits=[5, 0]), ValueError, "splits"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), splits=5), TypeError, "splits"),
        (dict(student=_s(0, 5), teacher=_s(0, 5)), ValueError, "batch size 0"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), temperature=0.0), ValueError, "temperature"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), temperature=-1.0), ValueError, "temperature"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), temperature=float("nan")), ValueError, "temperature"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), splits=[2, 3], temperature=[1.0]), ValueError, "temperature"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), splits=[2, 3], weights=[1.0]), ValueError, "weights"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), weights=[float("inf")]), ValueError, "weights"),
        (dict(student=torch.ones(2, 5, dtype=torch.int64), teacher=_s(2, 5)), TypeError, "student"),
        (dict(student=_s(2, 5), teacher=torch.ones(2, 5, dtype=torch.int32)), TypeError, "teacher"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), reduction="avg"), ValueError, "reduction"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), backend="tpu"), ValueError, "backend"),
        (dict(student=_s(5), teacher=_s(5)), ValueError, "2-D"),
        (dict(student=[_s(2, 3)], teacher=[_s(2, 3), _s(2, 3)]), ValueError, "equal length"),
        (dict(student=[_s(2, 3), _s(3, 3)], teacher=[_s(2, 3), _s(3, 3)]), ValueError, "batch size"),
        (dict(student=[_s(2, 3)], teacher=_s(2, 3)), TypeError, "both"),
        (dict(student="logits", teacher="logits"), TypeError, "student"),
        (dict(student=_s(2, 5), teacher=_s(2, 5), temperature=torch.tensor(2.0)), TypeError, "temperature"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("backend", backend_params(ALL_BACKENDS))
def test_bad_calls_raise(kwargs, error, match, backend):
    kwargs = dict(kwargs)
    kwargs.setdefault("backend", backend)
    with pytest.raises(error, match=match):
        rcfast.multihead_kd_loss(**kwargs)


def test_devices_must_match():
    meta = torch.empty(2, 5, device="meta")
    with pytest.raises(ValueError, match="same device"):
        rcfast.multihead_kd_loss(_s(2, 5), meta, backend="reference")


def test_unavailable_backend_names_the_reason():
    if "cuda" in rcfast.available_backends():
        pytest.skip("cuda backend is available here")
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        rcfast.multihead_kd_loss(_s(2, 5), _s(2, 5), backend="cuda")


@pytest.mark.slow  # a fresh Python subprocess
def test_triton_on_cpu_without_interpreter_raises():
    code = (
        "import torch, rcfast\n"
        "try:\n"
        "    rcfast.multihead_kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend='triton')\n"
        "except (ValueError, RuntimeError) as e:\n"
        "    assert 'triton' in str(e).lower(), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("with a GPU, triton on CPU tensors is a different error path")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr + result.stdout


def test_available_backends_lists_reference_first():
    backends = rcfast.available_backends()
    assert backends[0] == "reference"
    assert set(backends) <= {"reference", "cpu", "triton", "cuda"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rcfast.available_backends()  # asking is silent


def test_backend_probe_is_marked_constant_for_dynamo():
    """backends.py marks its availability probe the way torch.compiler.assume_constant_result
    does, without importing torch._dynamo at import time; a torch that changes the marker
    fails here (test_torch_compile_fullgraph would fail too)."""
    from rcfast.ops.backends import unavailable_reason

    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    assert getattr(marked, "_dynamo_marked_constant", False) is True
    assert unavailable_reason._dynamo_marked_constant is True


@pytest.mark.slow  # a fresh Python subprocess
def test_import_does_not_load_dynamo():
    code = "import sys, rcfast; print('torch._dynamo' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
